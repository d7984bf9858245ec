"""PPO's roles: workers (actor, critic, reference, reward) and the handles that call them, in this
process or in Ray actors. See `stema.roles.handles` and `stema.roles.workers`; `stema.roles.experience`
turns rollouts into trainer tensors. Importing this package imports neither Ray nor transformers."""
