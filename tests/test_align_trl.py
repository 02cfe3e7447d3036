"""The preference pipeline against trl 1.16's own trainers: same token ids, same numbers.

One tiny GPT-2-shaped model with random weights (and a perturbed copy as the DPO
reference) is exported to Hugging Face folders with the real GPT-2 tokenizer, loaded
in `transformers`, and handed to trl's `DPOTrainer`, `RewardTrainer` and
`experimental.orpo.ORPOTrainer` together with real pairs from LLMs-from-scratch's
preference file as {"prompt", "chosen", "rejected"} strings. Each test takes the one
collated batch of the trainer's own dataloader, checks that its token ids and learned
positions are exactly our `PreferenceBatches` batch of the same pairs, then runs the
trainer's own loss on it (the step-0 loss and the metrics it logs) and compares it with
our recipe objective on our batch. Nothing is downloaded: trl is only a test oracle.

Two trl 1.16 defaults would make the comparison meaningless and are switched off in
every config here: `bf16` defaults to True even on CPU (the reference model and
`compute_ref_log_probs` then run under bf16 autocast, off by ~1e-4 relative), and a
reward model padded with its eos token is read at the wrong position (see the reward
test).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import shared

from lmforge.align.losses import orpo_loss
from lmforge.config import Config
from lmforge.data.preference import PreferenceBatches, read_preferences, render_pair
from lmforge.interop.hf import save_hf
from lmforge.model import GPT
from lmforge.ops.loss import IGNORE_INDEX
from lmforge.recipes import dpo, orpo, reward
from lmforge.recipes.common import load_base
from lmforge.recipes.config import AlignConfig
from lmforge.recipes.preference import Reference, as_inputs, pair_logps
from lmforge.tokenizer import Tokenizer

TOL = 1e-5
PAIRS = 4  # one batch holds them all
MAX_TOKENS = 100  # prompt + longer response + <|endoftext|>, so nothing is truncated anywhere
CONTEXT = 128


@dataclass
class World:
    tok: Tokenizer
    pairs: list[tuple[str, str, str]]
    policy: GPT
    reference: GPT
    policy_dir: Path
    reference_dir: Path
    x: dict[str, torch.Tensor]  # our batch of all the pairs (as_inputs)
    labels: torch.Tensor

    def dataset(self, **extra: list):
        from datasets import Dataset

        p, c, r = zip(*self.pairs, strict=True)
        return Dataset.from_dict({"prompt": list(p), "chosen": list(c), "rejected": list(r), **extra})

    def hf_tokenizer(self):
        """A fresh transformers tokenizer read from the exported tokenizer.json (trainers change its pad token)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.policy_dir)

    def rows(self) -> dict[tuple[int, int], tuple[list[int], list[bool]]]:
        """Our batch as whole sequences: (pair, 0 chosen / 1 rejected) -> (token ids, which tokens are learned)."""
        ids, mask = self.x["input_ids"], self.x["attention_mask"]
        out = {}
        for b in range(ids.size(0)):
            for k in range(2):
                n = int(mask[b, k].sum())
                learned = (self.labels[b, k, :n] != IGNORE_INDEX).tolist()
                out[b, k] = (ids[b, k, :n].tolist() + [int(self.labels[b, k, n - 1])], [False, *learned])
        return out

    def match(self, theirs: dict[tuple[int, int], tuple[list[int], list[bool] | None]]) -> list[int]:
        """Which of our pairs each of trl's (shuffled) pairs is, after checking that both rows of
        every pair are ours token for token and end with exactly one <|endoftext|>, and that
        they learn the same positions (when trl marks them: a reward model learns none).
        `theirs` maps (pair, row) to (token ids, learned or None)."""
        ours = self.rows()
        order = []
        for j in range(PAIRS):
            found = [b for b in range(PAIRS) if ours[b, 0][0] == theirs[j, 0][0]]
            assert len(found) == 1, f"trl's pair {j} is none of ours (or several): {theirs[j, 0][0][:20]}..."
            b = found[0]
            for k in range(2):
                ids, learned = ours[b, k]
                assert theirs[j, k][0] == ids, f"trl's tokens of pair {j} row {k} differ from ours (pair {b})"
                if theirs[j, k][1] is not None:
                    assert theirs[j, k][1] == learned, f"trl learns other positions of pair {j} row {k} than ours"
                start = learned.index(True)  # the response: one run of learned tokens to the end, eot last
                assert not any(learned[:start]) and all(learned[start:])
                assert ids[-1] == self.tok.eot_id and ids[start:].count(self.tok.eot_id) == 1
            order.append(b)
        assert sorted(order) == list(range(PAIRS))
        return order


@torch.no_grad()
def randomize(model: GPT, seed: int) -> GPT:
    """Every parameter random (norm gains around 1): the embedding, which is also the tied
    head, large enough that next-token distributions are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(1.0 + 0.05 * noise)
        else:
            p.copy_(noise * (0.3 if name == "tok_emb.weight" else 0.1))
    return model.eval()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, gpt2_tok: Tokenizer) -> World:
    """The pairs, our policy and reference, their Hugging Face folders (weights + tokenizer) and our batch."""
    data = read_preferences(shared("llms-from-scratch/instruction-data-with-preference.json"))
    pairs = []
    for item in data.items:  # the file's first pairs short enough for every route to keep whole
        p, c, r = render_pair(item, data.kind, None)
        if len(gpt2_tok.encode(p)) + max(len(gpt2_tok.encode(c)), len(gpt2_tok.encode(r))) + 1 <= MAX_TOKENS:
            pairs.append((p, c, r))
        if len(pairs) == PAIRS:
            break
    config = Config.from_name("small", vocab_size=gpt2_tok.vocab_size, n_layer=2, n_head=4, n_embd=64, context_length=CONTEXT)
    policy = randomize(GPT(config), seed=0)
    reference = copy.deepcopy(policy)  # the policy "before training": near it, not equal (rewards not all 0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    root = tmp_path_factory.mktemp("align_trl")
    policy_dir = save_hf(policy, root / "policy", tokenizer=gpt2_tok)
    reference_dir = save_hf(reference, root / "reference", tokenizer=gpt2_tok)
    batch = PreferenceBatches(pairs, gpt2_tok, batch_size=PAIRS, drop_last=False).collate(range(PAIRS))
    x, labels = as_inputs(batch)
    return World(gpt2_tok, pairs, policy, reference, policy_dir, reference_dir, x, labels)


def hf_lm(path: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path)


def config_kwargs(out: Path) -> dict:
    """What every trainer config here shares: CPU, fp32 (trl 1.16 turns bf16 on by default), no logging, no hub."""
    return {"output_dir": str(out), "report_to": [], "use_cpu": True, "bf16": False, "push_to_hub": False,
            "per_device_train_batch_size": PAIRS, "max_length": CONTEXT, "seed": 0}


def close(a: float | torch.Tensor, b: float | torch.Tensor, tol: float = TOL, relative: bool = False) -> float:
    """max |a - b| (divided by |b| when `relative`), asserted to be within tol."""
    a, b = (torch.as_tensor(v).detach().double() for v in (a, b))
    diff = float(((a - b) / (b.abs() if relative else 1)).abs().max())
    assert diff <= tol, f"{a} vs {b}: differ by {diff:.3g}{' relative' if relative else ''} > {tol}"
    return diff


# --- DPO ------------------------------------------------------------------------------


def dpo_trainer(world: World, out: Path, *, beta: float, kind: str):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**config_kwargs(out), beta=beta, loss_type=[kind], precompute_ref_log_probs=False)
    trainer = DPOTrainer(model=hf_lm(world.policy_dir), ref_model=hf_lm(world.reference_dir), args=args,
                         train_dataset=world.dataset(), processing_class=world.hf_tokenizer())
    trainer.model.train()  # as trainer.train() leaves it for step 0 (trl zeroes the dropout; ours is 0 anyway)
    return trainer


def dpo_batch(world: World, trainer) -> tuple[dict[str, torch.Tensor], list[int]]:
    """The first batch of trl's train dataloader, and which of our pairs each of its pairs is.

    trl tokenizes prompt + response + eos text jointly and cuts where the prompt's tokens
    end; our prompt text ends in a newline, which GPT-2's pre-tokenizer never joins to
    what follows, so the ids are ours exactly (checked, not assumed)."""
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].size(0) == 2 * PAIRS  # all chosen rows, then all rejected rows
    theirs = {}
    for j in range(PAIRS):
        for k in range(2):
            row = k * PAIRS + j
            n = int(batch["attention_mask"][row].sum())
            theirs[j, k] = (batch["input_ids"][row, :n].tolist(), batch["completion_mask"][row, :n].bool().tolist())
    return batch, world.match(theirs)


def test_sequence_logprobs_equal_trl_dpo(world: World, tmp_path: Path) -> None:
    """`pair_logps` (sum and per-token mean over each response and its <|endoftext|>) is what
    trl's DPOTrainer computes per sequence (`compute_ref_log_probs`, its fused-LM-head
    log-probs summed over the completion mask), for the policy and the reference."""
    trainer = dpo_trainer(world, tmp_path, beta=0.1, kind="sigmoid")
    batch, order = dpo_batch(world, trainer)
    counts = batch["completion_mask"].sum(1).double().view(2, PAIRS).T  # (pairs, 2)
    diffs = []
    for theirs_model, ours_model in ((trainer.model, world.policy), (trainer.ref_model, world.reference)):
        with torch.no_grad():
            chosen, rejected = trainer.compute_ref_log_probs(theirs_model, batch)
            ours = pair_logps(ours_model.eval(), world.x, world.labels)
        theirs = torch.stack([chosen, rejected], 1).double()  # (pairs, 2) in trl's order
        assert torch.equal(ours.count[order].double(), counts)
        # the sums are -100 to -300, where fp32's spacing is 1.5e-5 to 3e-5: they agree to TOL relative
        diffs.append((close(ours.sum[order], theirs, relative=True), float((ours.sum[order] - theirs).abs().max()),
                      close(ours.value(average=True)[order], theirs / counts)))
    print("sums: max relative diff {:.1e}, max abs diff {:.1e}; means: max diff {:.1e}".format(*map(max, zip(*diffs))))


@pytest.mark.parametrize(("kind", "beta"), [("sigmoid", 0.1), ("ipo", 0.5)])
def test_dpo_step0_loss_and_metrics_equal_trl(world: World, tmp_path: Path, kind: str, beta: float) -> None:
    """trl's step-0 DPO (or IPO) loss and logged rewards, margins, accuracy and log-probs
    are our `dpo.objective` on our batch: the loss and the means over pairs.

    trl's IPO divides each summed log-ratio by its completion's token count, which is our
    logps="mean"; its logged rewards, though, stay beta x the *summed* log-ratios (what its
    DPO logs) while ours are those of the loss optimized (beta x the per-token mean), so for
    IPO the rewards are compared with our sum-based ones."""
    trainer = dpo_trainer(world, tmp_path, beta=beta, kind=kind)
    batch, _ = dpo_batch(world, trainer)
    loss = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    cfg = AlignConfig(beta=beta, dpo_loss=kind, logps="mean" if kind == "ipo" else "sum")
    ours = dpo.objective(cfg)(world.policy, Reference(world.policy, world.reference))(world.policy, world.x, world.labels)
    rewards = ours
    if kind == "ipo":
        rewards = dpo.objective(AlignConfig(beta=beta))(world.policy, Reference(world.policy, world.reference))(
            world.policy, world.x, world.labels)
        assert not torch.allclose(rewards.chosen_rewards, ours.chosen_rewards)  # the two reward scales do differ
    logps = pair_logps(world.policy, world.x, world.labels).sum
    diffs = {
        "loss": close(ours.loss.mean(), loss.detach()),
        "rewards/chosen": close(rewards.chosen_rewards.mean(), logged["rewards/chosen"]),
        "rewards/rejected": close(rewards.rejected_rewards.mean(), logged["rewards/rejected"]),
        "rewards/margins": close(rewards.margins.mean(), logged["rewards/margins"]),
        "rewards/accuracies": close(rewards.accuracy.mean(), logged["rewards/accuracies"], 0.0),
        "logps/chosen": close(logps[:, 0].mean(), logged["logps/chosen"], relative=True),  # ~ -150: see above
        "logps/rejected": close(logps[:, 1].mean(), logged["logps/rejected"], relative=True),
    }
    assert 0 < logged["rewards/accuracies"] < 1  # a non-trivial mix of wins and losses
    assert abs(logged["rewards/margins"]) > 1e-3  # the reference is not the policy: the rewards are not all 0
    print(kind, {k: f"{v:.1e}" for k, v in diffs.items()}, "loss", loss.item())


# --- reward model ---------------------------------------------------------------------

REWARD_MARGIN, REWARD_CENTER = 0.25, 0.01


@dataclass
class RewardRun:
    ours: GPT  # the recipe's reward model
    theirs: torch.nn.Module  # GPT2ForSequenceClassification with the same weights
    batch: dict[str, torch.Tensor]  # the first batch of trl's dataloader
    order: list[int]  # which of our pairs each of trl's pairs is
    loss: float  # trl's step-0 loss
    scores: torch.Tensor  # (pairs, 2) in trl's order
    logged: dict[str, float]


@pytest.fixture(scope="module")
def reward_run(world: World, tmp_path_factory: pytest.TempPathFactory) -> RewardRun:
    """trl's RewardTrainer on the same pairs, the same trunk and the same reward head, with a
    margin and the centring term on; its step-0 loss, scores and logged metrics.

    The model is the recipe's own: `load_base` reads the exported folder and adds a fresh
    one-output head. `export_hf` refuses a model with a classification head, so the HF
    twin is GPT2ForSequenceClassification on the exported trunk with that head copied into
    `score.weight` (both bias-free, (1, n_embd)).

    GPT2ForSequenceClassification reads each row at its *rightmost token that is not
    config.pad_token_id*; trl sets that to the tokenizer's pad token, which it takes from
    eos when none is set. Every sequence ends with <|endoftext|> = eos, so padding with eos
    would read the token before it (checked in the test); trl is given another pad token
    (padding is masked out of attention, so which one does not matter otherwise). trl
    tokenizes prompt + response + eos as one text; as for DPO, the ids are ours exactly.
    """
    from transformers import GPT2ForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    ours = load_base(AlignConfig(base=str(world.policy_dir)), labels=reward.REWARD_LABELS).eval()
    assert reward.is_reward_model(ours)
    with torch.no_grad():  # scores well away from 0, so accuracy and margins mean something
        ours.score.weight.mul_(20)
    theirs = GPT2ForSequenceClassification.from_pretrained(world.policy_dir, num_labels=1)
    assert theirs.score.bias is None and theirs.score.weight.shape == ours.score.weight.shape
    with torch.no_grad():
        theirs.score.weight.copy_(ours.score.weight)

    tokenizer = world.hf_tokenizer()
    tokenizer.pad_token = "!"
    args = RewardConfig(**config_kwargs(tmp_path_factory.mktemp("reward")), center_rewards_coefficient=REWARD_CENTER)
    trainer = RewardTrainer(model=theirs, args=args, train_dataset=world.dataset(margin=[REWARD_MARGIN] * PAIRS),
                            processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert theirs.config.pad_token_id == trainer.processing_class.pad_token_id != world.tok.eot_id
    rows = {}
    for j in range(PAIRS):
        for k in range(2):
            row = k * PAIRS + j  # all chosen rows, then all rejected rows
            rows[j, k] = (batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist(), None)
    order = world.match(rows)
    loss, outputs = trainer.compute_loss(trainer.model, batch, return_outputs=True)
    scores = outputs.logits.detach().squeeze(-1).view(2, PAIRS).T.double()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return RewardRun(ours, theirs, batch, order, loss.item(), scores, logged)


def test_reward_loss_and_metrics_equal_trl(world: World, reward_run: RewardRun, tmp_path: Path) -> None:
    """trl's RewardTrainer step-0 loss (margin and centring included), per-sequence scores,
    accuracy and margin are our `reward.objective`'s on the training batch the recipe feeds
    it: each row scored at its <|endoftext|> (put back after the next-token inputs, which
    stop one token short), as `score_rendered` scores the same text."""
    run = reward_run
    objective = reward.objective(AlignConfig(reward_margin=REWARD_MARGIN, center_rewards=REWARD_CENTER))(run.ours, None)
    with torch.no_grad():
        scores = reward.pair_scores(run.ours, world.x, world.labels)[run.order]
        out = objective(run.ours, world.x, world.labels)
        plain = reward.objective(AlignConfig())(run.ours, None)(run.ours, world.x, world.labels)
        rendered = reward.score_rendered(run.ours, [p for p, _, _ in world.pairs] * 2,
                                         [c for _, c, _ in world.pairs] + [r for _, _, r in world.pairs])
    diffs = {
        "scores": close(scores, run.scores),
        "score_rendered": close(torch.tensor(rendered).view(2, PAIRS).T[run.order], run.scores),
        "loss": close(out.loss.mean(), run.loss),
        "accuracy": close(out.accuracy.mean(), run.logged["accuracy"], 0.0),
        "margin": close(out.margins.mean(), run.logged["margin"]),
        "mean_reward": close(scores.mean(), run.logged["mean_reward"]),
    }
    assert 0 < run.logged["accuracy"] < 1 and abs(run.logged["margin"]) > 1e-2
    assert abs(float(plain.loss.mean()) - run.loss) > 1e-2  # the margin and the centring term did count

    # the trap avoided in the fixture: with pad = eos, transformers scores the token before <|endoftext|>
    pad = run.theirs.config.pad_token_id
    run.theirs.config.pad_token_id = world.tok.eot_id
    try:
        with torch.no_grad():
            at_eos = run.theirs(input_ids=run.batch["input_ids"], attention_mask=run.batch["attention_mask"]).logits
    finally:
        run.theirs.config.pad_token_id = pad
    assert (at_eos.squeeze(-1).view(2, PAIRS).T.double() - run.scores).abs().min() > 1e-3
    print({k: f"{v:.1e}" for k, v in diffs.items()}, "loss", run.loss)


# --- ORPO -------------------------------------------------------------------------------


def test_orpo_step0_loss_and_metrics_equal_trl(world: World, tmp_path: Path) -> None:
    """trl's experimental ORPOTrainer on the same pairs: its odds-ratio term, logged
    rewards (lambda x per-token mean log-probs), margins, accuracy and log-probs equal
    our `orpo.objective`'s; its step-0 loss is our `orpo_loss` fed trl's SFT term.

    The two SFT terms differ by design: trl's NLL is the token-mean cross-entropy over the
    whole chosen sequences, prompt tokens included, pooled over the batch; ours (the
    paper's L_SFT on y_w) is each pair's mean over its response and <|endoftext|>,
    averaged over pairs. So trl's NLL is recomputed here with our model on our batch,
    prompt included (pooled over the batch, so no batch-size-1 restriction is needed), and
    our objective's loss is shown to differ from trl's by exactly the two NLLs' difference.

    trl's ORPO prepends the tokenizer's bos_token to every prompt; the exported
    tokenizer_config names <|endoftext|> as bos (as GPT-2's own does), but lmforge's GPT-2
    prompts start with no such token, so trl is given the tokenizer without a bos_token.
    """
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    lam = 0.5
    tokenizer = world.hf_tokenizer()
    assert tokenizer.bos_token_id == world.tok.eot_id  # what trl would otherwise put before every prompt
    tokenizer.bos_token = None
    tokenizer.pad_token = tokenizer.eos_token
    args = ORPOConfig(**config_kwargs(tmp_path), beta=lam, remove_unused_columns=False)
    trainer = ORPOTrainer(model=hf_lm(world.policy_dir), args=args, train_dataset=world.dataset(), processing_class=tokenizer)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    theirs = {}
    for j in range(PAIRS):
        for k, name in enumerate(("chosen", "rejected")):
            keep = batch[f"{name}_attention_mask"][j].bool()
            theirs[j, k] = (batch[f"{name}_input_ids"][j][keep].tolist(), (batch[f"{name}_labels"][j][keep] != -100).tolist())
    world.match(theirs)  # the ids and learned positions are ours (the metrics are means: trl's order does not matter)

    loss = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}

    ours = orpo.objective(AlignConfig(orpo_lambda=lam))(world.policy, None)(world.policy, world.x, world.labels)
    mean = pair_logps(world.policy, world.x, world.labels).value(average=True)
    # trl's SFT term with our model: every real token of the chosen rows after the first, pooled over the batch
    ids, mask, labels = world.x["input_ids"][:, 0], world.x["attention_mask"][:, 0], world.labels[:, 0]
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = torch.where(mask[:, 1:].bool(), ids[:, 1:], IGNORE_INDEX)
    targets = torch.where(labels != IGNORE_INDEX, labels, targets)  # the last input's target: <|endoftext|>
    with torch.no_grad():
        trl_nll = world.policy(ids, targets, attention_mask=mask)
    as_trl = orpo_loss(trl_nll, mean[:, 0], mean[:, 1], lam=lam)
    our_nll = (-mean[:, 0]).mean()
    diffs = {
        "nll_loss": close(trl_nll, logged["nll_loss"]),
        "loss (trl's SFT term)": close(as_trl.loss.mean(), loss.detach()),
        "loss (ours)": close(ours.loss.mean(), loss.detach() - logged["nll_loss"] + our_nll),
        "log_odds_ratio": close(((as_trl.loss - trl_nll) / -lam).mean(), logged["log_odds_ratio"]),
        "rewards/chosen": close(ours.chosen_rewards.mean(), logged["rewards/chosen"]),
        "rewards/rejected": close(ours.rejected_rewards.mean(), logged["rewards/rejected"]),
        "rewards/margins": close(ours.margins.mean(), logged["rewards/margins"]),
        "rewards/accuracies": close(ours.accuracy.mean(), logged["rewards/accuracies"], 0.0),
        "logps/chosen": close(mean[:, 0].mean(), logged["logps/chosen"]),
        "logps/rejected": close(mean[:, 1].mean(), logged["logps/rejected"]),
    }
    assert abs(float(our_nll) - logged["nll_loss"]) > 1e-2  # the SFT terms really are different numbers
    assert abs(logged["rewards/margins"]) > 1e-3
    print({k: f"{v:.1e}" for k, v in diffs.items()}, "loss", float(loss))
