"""The one reward readout (`stema.models.value_head.reward_scores`): every consumer of a reward
model reads it at the last attended token, also when the tokenizer pads with its EOS token.

Tolerances: the consumers run the same fp32 model on the same tokens, in batches of other sizes
and padding widths, so only the order of fp32 reductions differs: with hidden size 32 and scores of
order 1, that is a few ulp of 1 (1.2e-7 each); 1e-5 leaves ample room on any x86 kernel path.
`stema annotate` writes its predictions rounded to 4 decimals, so those are compared within 5e-5
plus the same 1e-5.
"""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from stema.cli import main
from stema.config import DataConfig, ModelConfig, PPOConfig, RSConfig
from stema.data import load_preference_data
from stema.data.collate import collate_pairs
from stema.models import loading, tiny
from stema.models.tiny import TinyModelSpec, save_tiny_model
from stema.models.value_head import last_attended, reward_scores, token_scores
from stema.rewards import Reward, right_padded
from stema.roles.reward import RewardWorker
from stema.trainers.reward import PairwiseRewardAlgorithm, sequence_rewards
from stema.training.loop import run_evaluation

ATOL = 1e-5
PAIRS = [
    {"prompt": "12+30=", "chosen": "42", "rejected": "41"},
    {"prompt": "7*6=", "chosen": "42", "rejected": "4"},
    {"prompt": "1+1=", "chosen": "2", "rejected": "11"},
]


def save_model(path, *, pad_is_eos: bool):
    """A small tiny-Llama folder; with `pad_is_eos` its tokenizer has no pad token, so STEMA pads
    with EOS (as for Llama-3 and Mistral)."""
    spec = TinyModelSpec(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    save_tiny_model(path, spec)
    if pad_is_eos:
        tokenizer = tiny.build_tokenizer()
        tokenizer.pad_token = None
        tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pad_eos_model(tmp_path_factory):
    return save_model(tmp_path_factory.mktemp("pad_eos") / "tiny", pad_is_eos=True)


def sequences_ending_in_eos(tokenizer):
    """Token lists of prompt + completion + EOS of different lengths."""
    return [tokenizer("12+30=42").input_ids + [tokenizer.eos_token_id], tokenizer("7*6=4").input_ids + [tokenizer.eos_token_id],
            tokenizer("1").input_ids + [tokenizer.eos_token_id]]


def test_readout_is_the_score_at_the_last_attended_token_of_a_padded_batch(tmp_path, pad_eos_model):
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(pad_eos_model)), num_labels=2, cache_dir=tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    sequences = sequences_ending_in_eos(tokenizer)
    input_ids, attention_mask = right_padded(sequences, tokenizer.pad_token_id)
    assert last_attended(attention_mask).tolist() == [len(s) - 1 for s in sequences]
    # Left padding (not what STEMA collates; transformers' position ids would shift) ends every row at the last column.
    assert last_attended(attention_mask.flip(-1)).tolist() == [input_ids.shape[1] - 1] * 3
    with torch.no_grad():
        right = reward_scores(model, input_ids, attention_mask)  # [3, 2]
        alone = torch.cat([token_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.int64))[:, -1] for s in sequences])
    assert right.shape == (3, 2)
    torch.testing.assert_close(right, alone, rtol=0, atol=ATOL)


@pytest.mark.parametrize("pad_is_eos", [False, True], ids=["own_pad", "pad_eos"])
def test_exported_model_in_transformers_scores_as_documented(tmp_path, pad_is_eos):
    """With its own pad token, transformers' pooled logits are the readout; with pad == EOS they
    are the readout of the sequence without its trailing EOS (the documented difference)."""
    folder = save_model(tmp_path / "tiny", pad_is_eos=pad_is_eos)
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(folder)), num_labels=1, cache_dir=tmp_path)
    exported = loading.export_hf(model, tokenizer, tmp_path / "hf", merge_lora=True)
    hf_model = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    sequences = sequences_ending_in_eos(tokenizer)
    input_ids, attention_mask = right_padded(sequences, tokenizer.pad_token_id)
    without_eos = right_padded([s[:-1] for s in sequences], tokenizer.pad_token_id)
    with torch.no_grad():
        hf = hf_model(input_ids=input_ids, attention_mask=attention_mask).logits
        ours = reward_scores(hf_model, input_ids, attention_mask)
        ours_without_eos = reward_scores(hf_model, *without_eos)
    if pad_is_eos:
        torch.testing.assert_close(hf, ours_without_eos, rtol=0, atol=ATOL)
        assert (hf - ours).abs().max() > 1e-3  # a different token: the readout is not transformers' pooling here
    else:
        torch.testing.assert_close(hf, ours, rtol=0, atol=ATOL)


def test_a_reward_model_trained_with_pad_eos_scores_the_same_in_every_consumer(tmp_path, pad_eos_model):
    """`stema rm` trains on a pad == EOS tokenizer; its export is scored alike by the training
    readout, the evaluation (mean margin of held-out pairs), `stema annotate`, PPO's reward role and
    rejection sampling's reward."""
    rm = tmp_path / "rm"
    assert main(["rm", f"model.path={pad_eos_model}", f"trainer.output_dir={rm}", "data.train=builtin", "data.builtin_size=16",
                 "data.max_length=48", "trainer.max_steps=3", "trainer.global_batch_size=4", "trainer.micro_batch_size=4",
                 "optim.lr=1e-2", "trainer.progress_bar=false", "trainer.tensorboard=false"]) == 0
    exported = rm / "hf"
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(pair) + "\n" for pair in PAIRS))
    model, tokenizer = loading.load_reward_model(ModelConfig(path=str(exported)), num_labels=1, cache_dir=tmp_path)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    pairs, _ = load_preference_data(DataConfig(train=str(pairs_file)), tokenizer)
    assert all(pair.chosen_ids[-1] == tokenizer.eos_token_id for pair in pairs)

    # Training and evaluation (`PairwiseRewardAlgorithm.loss` -> `sequence_rewards`): chosen rows, then rejected.
    model.eval()
    with torch.no_grad():
        training = sequence_rewards(model, collate_pairs(pairs, tokenizer.pad_token_id))[:, 0]
        hf_pooled = model(**{key: value for key, value in collate_pairs(pairs, tokenizer.pad_token_id).items()
                             if key in ("input_ids", "attention_mask")}).logits[:, 0]
    # The old training readout (transformers' pooling: the token before the EOS) gives other scores.
    assert (training - hf_pooled).abs().max() > 1e-3
    algorithm = PairwiseRewardAlgorithm(pad_id=tokenizer.pad_token_id, use_margin=False, center_rewards_coefficient=0.0,
                                        micro_batch_size=2)
    evaluation = run_evaluation(model, algorithm, pairs)  # what `stema rm` logs for held-out pairs
    chosen, rejected = training.chunk(2)
    assert evaluation["margin"] == pytest.approx(float((chosen - rejected).mean()), abs=ATOL)

    prompt_ids = [pair.prompt_ids for pair in pairs] * 2
    response_ids = [pair.chosen_ids[len(pair.prompt_ids):] for pair in pairs] + [pair.rejected_ids[len(pair.prompt_ids):] for pair in pairs]
    prompts = [pair["prompt"] for pair in PAIRS] * 2
    texts = [pair["chosen"] for pair in PAIRS] + [pair["rejected"] for pair in PAIRS]

    ppo_config = PPOConfig()
    ppo_config.reward.model = str(exported)
    ppo_scores = RewardWorker(reward_cfg=ppo_config.reward, dtype=ppo_config.model.dtype, cache_dir=str(tmp_path / "cache")).score(prompts, texts, prompt_ids, response_ids)
    rs_config = RSConfig()
    rs_config.reward.model, rs_config.reward.micro_batch_size = str(exported), 2
    rs_scores = Reward.from_config(rs_config.reward, dtype="float32", device=torch.device("cpu"),
                                   cache_dir=tmp_path / "cache").score(prompts, texts, prompt_ids, response_ids)

    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in zip(prompts, texts)))
    annotated = tmp_path / "annotated.jsonl"
    assert main(["annotate", f"model.path={exported}", f"data.train={records}", "data.attributes=[reward]",
                 f"annotate.output={annotated}", "annotate.batch_size=4"]) == 0
    annotate_scores = torch.tensor([json.loads(line)["reward"] for line in annotated.read_text().splitlines()])

    torch.testing.assert_close(ppo_scores, training, rtol=0, atol=ATOL)
    torch.testing.assert_close(rs_scores, training, rtol=0, atol=ATOL)
    torch.testing.assert_close(annotate_scores, training, rtol=0, atol=5e-5 + ATOL)
