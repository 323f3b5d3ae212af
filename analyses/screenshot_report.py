"""Screenshots of a run's report.html in headless Chromium: the charts and the explorer.

    python analyses/screenshot_report.py RUN [--out figures/report] [--sample 0] [--token 6] \
        [--site SITE --layer L] [--lens-site resid_post]

Writes OUT_charts.png and OUT_explorer.png: the sample in context, its tokens, the logit-lens
grid (of --lens-site) and the details of the sample's token number --token, clicked. The tokens
are coloured as the page chooses (the most varied site and layer) unless --site and --layer are
given. Uses Debian's chromium (apt-get install chromium) through Playwright, with the network
blocked: the page must not need it.
"""

import argparse
from pathlib import Path

from playwright.sync_api import sync_playwright

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def main(args):
    page_path = Path(args.run) / "report.html"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        page.route(
            "**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort()
        )
        page.goto(page_path.resolve().as_uri())
        page.locator("#charts").screenshot(path=f"{out}_charts.png")
        page.select_option("#sample-select", index=args.sample)
        if args.site is not None:
            page.select_option("#site-select", args.site)
            page.select_option("#layer-select", str(args.layer))
        page.select_option("#lens-site-select", args.lens_site)
        page.locator("#token-text .tok").nth(args.token).click()
        page.locator("#explorer").screenshot(path=f"{out}_explorer.png")
        browser.close()
    print(f"wrote {out}_charts.png and {out}_explorer.png")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--out", default="figures/report")
    parser.add_argument("--sample", type=int, default=0, help="index in the sample menu")
    parser.add_argument("--token", type=int, default=6, help="index of the token to click")
    parser.add_argument("--site", help="site colouring the tokens [default: the page's choice]")
    parser.add_argument("--layer", type=int, default=2, help="its layer (with --site)")
    parser.add_argument("--lens-site", default="resid_post", help="site of the logit-lens grid")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    main(parser.parse_args())
