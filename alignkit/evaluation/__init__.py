"""Reward-source evaluation: metrics and the `alignkit eval-rm` command."""
