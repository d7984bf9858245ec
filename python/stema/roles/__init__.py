"""PPO's roles: one file per role worker (`actor`, `critic`, `reference`, `reward`, `rollout`) and
the handles that call them, in this process or in Ray actors (one, or a group forming a
torch.distributed world). See `stema.roles.handles`, `stema.roles.groups` and
`stema.roles.colocation`; `stema.roles.experience`
turns rollouts into trainer tensors. Importing this package imports neither Ray nor transformers."""
