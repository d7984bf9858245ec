"""A user's advantage estimator, registered outside STEMA and chosen from the command line (run
from the repository root, so that `examples.plugins.dr_grpo` is importable):

    stema grpo -c examples/grpo/tiny_builtin.yaml --import examples.plugins.dr_grpo ppo.advantage=dr_grpo

`dr_grpo`: a sample's advantage is its score minus the mean score of its prompt's samples, not
divided by their standard deviation (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783:
the division weights prompts that are almost always or almost never answered right the most)."""

import torch

from stema.losses.advantages import AdvantageInputs, register_advantage, sequence_scores


@register_advantage("dr_grpo", needs_critic=False)
def dr_grpo(inputs: AdvantageInputs) -> tuple[torch.Tensor, None]:
    """`[B, T]` advantages (each sample's centred score at every one of its actions), no returns."""
    scores = sequence_scores(inputs).float()  # [B]
    _, group = torch.unique(inputs.group_ids.to(scores.device), return_inverse=True)  # [B] in 0..G-1
    count = torch.zeros(int(group.max()) + 1, device=scores.device).index_add_(0, group, torch.ones_like(scores))
    total = torch.zeros_like(count).index_add_(0, group, scores)
    centred = scores - (total / count)[group]
    return centred[:, None] * inputs.mask.float(), None
