"""PPO's roles: workers (actor, critic, reference, reward) and the handles that call them, in this
process or in Ray actors (one, or a group forming a torch.distributed world). See `stema.roles.handles`,
`stema.roles.groups`, `stema.roles.colocation` and `stema.roles.workers`; `stema.roles.experience`
turns rollouts into trainer tensors. Importing this package imports neither Ray nor transformers."""
