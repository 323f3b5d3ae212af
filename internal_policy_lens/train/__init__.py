"""Bottom-up Policy Optimization: the loop, its pure loss, rollouts, rewards, checkpoints."""
