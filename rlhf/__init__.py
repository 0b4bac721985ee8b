"""Post-training from preferences and rewards: the reward model, PPO, DPO and GRPO stages."""
