"""One dataclass for a fine-tuning run: the training fields of `TrainConfig`, plus what
to start from (`base`), which weights learn (`trainable`, LoRA, 4-bit base) and how the
task's examples become tokens.

Every field is a flag (`lora_r` -> `--lora-r`) and a key of a TOML file, as for
`lmforge pretrain`; the run writes `run.json` beside its checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoRAConfig
from lmforge.train.config import TrainConfig

TRAINABLE_HELP = "all | last-N (the last N blocks, the final norm and the head) | head"


@dataclass
class FinetuneConfig(TrainConfig):
    """A fine-tuning run. `data` is the task's file (SMS spam collection, CSV, JSON, JSONL)."""

    data: str = ""  # the task's file: SMS spam collection / CSV / JSONL (classify), Alpaca or chat JSON / JSONL (instruct)
    base: str = ""  # model folder, training run, Hugging Face folder or llama2.c .bin to start from
    from_scratch: bool = False  # the base's shape and tokenizer, fresh random weights (the baseline)
    out: str = "runs/finetune"  # run folder: checkpoints/, metrics.json, metrics.jsonl, loss.png; responses.jsonl (instruct)
    # training defaults of the book's fine-tuning chapters: small lr, short warm-up, a few epochs
    lr: float = 5e-5
    min_lr: float = 5e-6
    batch_size: int = 8  # examples per micro-batch per process (padded to the longest in the batch)
    max_steps: int = 0  # optimizer steps; 0: --epochs passes over the training split
    time_limit: float = 0.0  # seconds; stop early (with a checkpoint) when reached; 0: none
    epochs: float = 0.0  # passes over the training split when --max-steps is 0
    eval_every: int = 50  # steps between validation-loss checks during training; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    eval_batches: int = 0  # batches of the validation split read by each check during training; 0: all of it
    eval_examples: int = 200  # examples per split measured before and after training, and test prompts answered; 0: all
    sample_prompts: list[str] = field(default_factory=list)  # texts continued at each validation check, as is (no template)
    # which weights learn
    trainable: str = "all"  # all | last-N (the last N blocks, the final norm and the head) | head
    lora_r: int = 0  # adapter rank; 0: no LoRA
    lora_alpha: float = 16.0  # adapter scale alpha / r
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"])  # q k v o (default), gate up down, all-linear
    lora_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r (also --rslora)
    quantize: str = ""  # "nf4": the frozen base in 4 bits (QLoRA; needs --lora-r)
    # how examples become tokens
    max_length: int = 0  # tokens per example; 0: the model's context length
    text_field: str = "text"  # classification: the text's column or key (CSV, JSON)
    label_field: str = "label"  # classification: the label's column or key
    padding_side: str = "right"  # classification batches: right | left (both exact)
    mask_prompt: bool = True  # instruction tuning: learn the responses only
    template: str = "auto"  # instruction tuning: alpaca | chat | dialogue | auto (from the data)
    # keeping what the base knew: windows of its pretraining data mixed into every batch
    replay: str = ""  # the base's pretraining data (a `lmforge data prepare` folder), mixed into every batch; "": none
    replay_fraction: float = 0.1  # with --replay: the share of each step's loss (and about its tokens) from it; 0: measure only

    def validate(self) -> None:
        if self.eval_examples < 0:
            raise LmforgeError(f"--eval-examples must be a number of examples >= 0 (0: every example), got {self.eval_examples}")
        if not math.isfinite(self.epochs) or self.epochs < 0:
            raise LmforgeError(f"--epochs must be a finite number of passes >= 0, got {self.epochs}")
        if self.max_steps == 0 and self.epochs <= 0:  # a time limit (or a token budget) alone made a 1-step run
            raise LmforgeError("say how long to train: --epochs N or --max-steps N"
                               + (" (--time-limit only stops a run early)" if self.time_limit > 0 else ""))
        # with --epochs the recipe sets max_steps once it has counted the examples
        TrainConfig.validate(dataclasses.replace(self, max_steps=self.max_steps or 1))
        if not self.base:
            raise LmforgeError("say what to fine-tune: --base DIR (a model folder or a training run; "
                               "with --from-scratch only its shape and tokenizer are used)")
        self.trainable_blocks()  # checks the spelling
        if self.lora_r < 0:
            raise LmforgeError(f"--lora-r must be positive (0: no LoRA), got {self.lora_r}")
        if self.quantize not in ("", "nf4"):
            raise LmforgeError(f"--quantize takes nf4, got {self.quantize!r}")
        if self.quantize and not self.lora_r:
            raise LmforgeError("--quantize nf4 freezes the base in 4 bits: give adapters to train with --lora-r (e.g. --lora-r 8)")
        if self.padding_side not in ("left", "right"):
            raise LmforgeError(f"--padding-side must be left or right, got {self.padding_side!r}")
        if self.template not in ("auto", "alpaca", "chat", "dialogue"):
            raise LmforgeError(f"--template must be auto, alpaca, chat or dialogue, got {self.template!r}")
        if not (math.isfinite(self.replay_fraction) and 0 <= self.replay_fraction < 1):
            raise LmforgeError(f"--replay-fraction must be in [0, 1) (the share of the loss from replay; 0: only measure "
                               f"the pretraining loss), got {self.replay_fraction}")

    # The LoRA fields carry a `lora_` prefix here, where they sit among every other
    # setting of a run; `LoRAConfig` (and an adapter's JSON) names them without it.
    # what a resumed run may not change: the base, its head and which weights learn
    model_settings: ClassVar[tuple[str, ...]] = (
        "base", "from_scratch", "trainable", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "lora_rslora", "quantize",
    )
    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {"lora_rslora": ("--rslora",)}
    _renamed: ClassVar[dict[str, str]] = {"rslora": "lora_rslora"}  # run.json of runs before the prefix

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> FinetuneConfig:
        values = {cls._renamed.get(k, k): v for k, v in values.items()}
        return super().from_dict(values, source)

    def lora(self) -> LoRAConfig | None:
        """The adapters this run trains (None without --lora-r)."""
        if not self.lora_r:
            return None
        return LoRAConfig(r=self.lora_r, alpha=self.lora_alpha, dropout=self.lora_dropout, targets=tuple(self.lora_targets),
                          rslora=self.lora_rslora)

    def trainable_blocks(self) -> int | None:
        """None: every weight; N: only the last N blocks (0 = the head alone) + norm + head."""
        if self.trainable == "all":
            return None
        if self.trainable == "head":
            return 0
        m = re.fullmatch(r"last-(\d+)", self.trainable)
        if not m:
            raise LmforgeError(f"--trainable must be {TRAINABLE_HELP}; got {self.trainable!r}")
        return int(m.group(1))


@dataclass
class AlignConfig(FinetuneConfig):
    """A preference-alignment run (`lmforge align reward | dpo | orpo | iterative-dpo`):
    `data` is a file of preference pairs (prompt, chosen, rejected) in any shape
    `lmforge.data.preference` reads; `base` the model to align (an SFT model for DPO,
    a pretrained base for ORPO)."""

    out: str = "runs/align"  # run folder: checkpoints/, metrics.json, metrics.jsonl, loss.png, responses.jsonl
    lr: float = 5e-6  # the LLMs-from-scratch DPO notebook's rate for full weights; LoRA takes ~10x more
    min_lr: float = 5e-7
    epochs: float = 1.0  # passes over the training pairs when --max-steps is 0
    eval_every: int = 0  # steps between validation-loss checks during training; 0: only at the end
    # sequence log-probabilities (DPO, ORPO's odds use the mean whatever this says)
    logps: str = "sum"  # sum over the response tokens (the DPO paper, trl) | mean (per token: the book's notebook)
    # DPO
    beta: float = 0.1  # DPO: the KL penalty's weight; smaller lets the policy move further from the reference
    dpo_loss: str = "sigmoid"  # sigmoid (DPO) | ipo (IPO: a squared loss that does not push margins to infinity)
    label_smoothing: float = 0.0  # conservative DPO: the assumed share of flipped preference labels, in [0, 0.5)
    precompute_ref: bool = False  # reference log-probs computed once (cached in the run folder), reference freed
    rpo_alpha: float = 0.0  # DPO: weight of the chosen response's per-token NLL added to the loss (RPO); 0: plain DPO
    # ORPO
    orpo_lambda: float = 0.1  # ORPO: the odds-ratio term's weight beside the SFT loss (also --lambda)
    # reward model
    reward_margin: float = 0.0  # reward model: the margin the chosen score must beat the rejected one by
    center_rewards: float = 0.0  # reward model: weight of the (r_chosen + r_rejected)^2 penalty that centres scores on 0
    # iterative (online) DPO
    reward: str = ""  # a reward model (`lmforge align reward`): ranks iterative DPO's samples; "": none
    prompts: str = ""  # iterative DPO: prompts to sample from (a preference or instruction file; its prompts are used)
    rounds: int = 2  # iterative DPO: sample, rank, train; each round's policy is the next round's reference
    rollout_tokens: int = 128  # iterative DPO: new tokens per sampled response, at most
    rollout_temperature: float = 1.0  # iterative DPO: sampling temperature of the two responses per prompt

    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {**FinetuneConfig.flag_aliases, "orpo_lambda": ("--lambda",)}

    def validate(self) -> None:
        FinetuneConfig.validate(dataclasses.replace(self, data=self.data or self.prompts))  # iterative DPO reads --prompts
        if self.logps not in ("sum", "mean"):
            raise LmforgeError(f"--logps must be sum or mean, got {self.logps!r}")
        if self.dpo_loss not in ("sigmoid", "ipo"):
            raise LmforgeError(f"--dpo-loss must be sigmoid or ipo, got {self.dpo_loss!r}")
        if not (math.isfinite(self.beta) and self.beta > 0):
            raise LmforgeError(f"--beta must be a positive number, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise LmforgeError(f"--label-smoothing must be in [0, 0.5) (a share of flipped labels), got {self.label_smoothing}")
        if self.dpo_loss == "ipo" and self.label_smoothing:
            raise LmforgeError("--label-smoothing is conservative DPO's, for --dpo-loss sigmoid; IPO takes none")
        if not (math.isfinite(self.orpo_lambda) and self.orpo_lambda >= 0):
            raise LmforgeError(f"--lambda must be a number >= 0, got {self.orpo_lambda}")
        for name in ("reward_margin", "center_rewards", "rollout_temperature", "rpo_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LmforgeError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if self.rounds < 1:
            raise LmforgeError(f"--rounds must be at least 1, got {self.rounds}")
        if self.rollout_tokens < 1:
            raise LmforgeError(f"--rollout-tokens must be at least 1, got {self.rollout_tokens}")


RL_ALGOS = ("ppo", "rloo", "grpo")


@dataclass
class RLConfig(AlignConfig):
    """An RLHF run (`lmforge align ppo`): the policy (`base`, also --policy) samples
    responses to `prompts`, the `reward` model scores them, and PPO (or RLOO, GRPO)
    raises the score while a KL penalty keeps the policy near where it started. An
    iteration samples `rollout_batch` prompts x `samples` responses, then takes
    `ppo_epochs` passes over them in minibatches of `batch_size` responses."""

    out: str = "runs/ppo"  # run folder: checkpoints/, metrics.json, metrics.jsonl, rl.png, responses.jsonl
    reward: str = ""  # the reward: a reward model (`align reward`) or a classifier (`finetune classify`, with --reward-label)
    prompts: str = ""  # prompts to sample from: .txt (one per line), JSON/JSONL rows with "prompt", or a preference-pairs file
    algo: str = "ppo"  # ppo (value head, GAE) | rloo (leave-one-out baseline) | grpo (group-normalised rewards)
    iterations: int = 100  # sample-score-learn iterations
    lr: float = 3e-5  # what moved a 14M policy without breaking it (sentiment benchmark); larger models take less
    min_lr: float = 3e-5  # a constant rate after the warm-up, as PPO usually runs
    warmup_steps: int = 0
    warmup_fraction: float = 0.0
    rollout_batch: int = 32  # prompts sampled per iteration
    samples: int = 0  # responses per prompt; 0: 1 for ppo, 4 for rloo and grpo
    rollout_tokens: int = 48  # new tokens per response, at most
    rollout_temperature: float = 0.7  # sampling temperature of the rollouts (log-probs are taken at the same temperature)
    ppo_epochs: int = 2  # passes over each iteration's responses
    batch_size: int = 8  # responses per minibatch (one optimizer step)
    clip_range: float = 0.2  # PPO: how far pi / pi_old may move per iteration before the surrogate clips
    value_clip: float = 0.2  # PPO: how far a value may move from the rollout's before its loss clips
    vf_coef: float = 0.1  # PPO: the value loss's weight
    value_lr: float = 1e-3  # PPO: the value head's learning rate (a linear head on the trunk's features, from zero)
    gamma: float = 1.0  # PPO: discount over response tokens
    lam: float = 1.0  # PPO: GAE's lambda (1: Monte-Carlo returns, the value a baseline only; < 1 leans on the values)
    entropy_coef: float = 0.0  # weight of an entropy bonus; 0: none
    kl_coef: float = 0.05  # the KL penalty's weight per token (the start value when --target-kl is set)
    kl_estimator: str = "k1"  # k1 (log pi - log ref) | k3 ((r - 1) - log r: never negative)
    target_kl: float = 0.0  # adapt --kl-coef so the KL per response approaches this (nats); 0: fixed coefficient
    kl_horizon: int = 10000  # adaptive KL: responses over which the coefficient may move by up to 20%
    reward_label: str = ""  # a classifier as reward (`finetune classify`): the label whose probability is the score
    missing_eos_penalty: float = 0.0  # subtracted from the score of a response that never ended (no <|endoftext|>)
    reward_norm: bool = False  # scores standardised by their running mean and std
    reward_clip: float = 0.0  # scores clipped to [-c, c] after normalising; 0: no clipping
    stop_kl: float = 100.0  # stop (keeping the last checkpoint) when the KL per response exceeds this; 0: never
    eval_examples: int = 64  # held-out prompts answered greedily before and after
    held_out_every: int = 0  # iterations between held-out measures during training (held_out/iteration-K.jsonl); 0: none
    save_every: int = 0  # steps (minibatches) between checkpoints, mid-iteration ones keep the rollout; 0: only at the end

    flag_aliases: ClassVar[dict[str, tuple[str, ...]]] = {**AlignConfig.flag_aliases, "base": ("--policy",)}

    def validate(self) -> None:
        if self.iterations < 1:
            raise LmforgeError(f"--iterations must be at least 1, got {self.iterations}")
        AlignConfig.validate(dataclasses.replace(self, max_steps=self.max_steps or 1))
        if self.algo not in RL_ALGOS:
            raise LmforgeError(f"--algo must be one of {', '.join(RL_ALGOS)}, got {self.algo!r}")
        if self.kl_estimator not in ("k1", "k3"):
            raise LmforgeError(f"--kl-estimator must be k1 or k3, got {self.kl_estimator!r}")
        if self.held_out_every < 0:
            raise LmforgeError(f"--held-out-every must be a number of iterations >= 0 (0: before and after only), got "
                               f"{self.held_out_every}")
        if self.responses_per_iteration % (self.batch_size * self.grad_accum):
            raise LmforgeError(f"an iteration's {self.responses_per_iteration} responses (--rollout-batch x --samples) must "
                               f"split into whole minibatches of --batch-size x --grad-accum = {self.batch_size * self.grad_accum}")
        for name in ("rollout_batch", "ppo_epochs", "kl_horizon"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.samples < 0 or (self.algo != "ppo" and self.samples == 1):
            raise LmforgeError(f"--samples must be 0 (the algorithm's default) or a count; {self.algo} needs at least 2 "
                               f"responses per prompt to compare, got {self.samples}")
        if self.rollout_temperature <= 0:
            raise LmforgeError("--rollout-temperature must be above 0: PPO learns from sampled responses")
        if not (math.isfinite(self.value_lr) and self.value_lr > 0):
            raise LmforgeError(f"--value-lr must be a positive learning rate, got {self.value_lr}")
        for name in ("clip_range", "value_clip", "vf_coef", "entropy_coef", "kl_coef", "target_kl", "missing_eos_penalty",
                     "reward_clip", "stop_kl"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise LmforgeError(f"--{name.replace('_', '-')} must be a number >= 0, got {value}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LmforgeError(f"--gamma and --lam must be in [0, 1], got {self.gamma} and {self.lam}")

    @property
    def responses_per_prompt(self) -> int:
        return self.samples or (1 if self.algo == "ppo" else 4)

    @property
    def responses_per_iteration(self) -> int:
        return self.rollout_batch * self.responses_per_prompt

    @property
    def minibatches(self) -> int:
        """Optimizer steps per pass over an iteration's responses."""
        return max(1, math.ceil(self.responses_per_iteration / (self.batch_size * self.grad_accum)))

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches
