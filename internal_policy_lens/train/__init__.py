"""Bottom-up Policy Optimization: rollouts, rewards, the pure loss and the training loop."""
