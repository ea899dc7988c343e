"""LLM QAT example: a small Llama trained with PARQ through Hugging Face's ``Trainer``.

Nothing is downloaded. The model is a ``transformers`` ``LlamaForCausalLM`` built from a
``LlamaConfig`` with random initialization (default: hidden 128, 2 layers, 4 heads, MLP
384, context 128), over bytes: the tokenizer is ``list(text.encode("utf-8"))``, so the
vocabulary is the 256 byte values (no hub tokenizer). The corpus is CPython's own
``pydoc_data.topics.topics`` (the ``help()`` texts of the language reference, about
466 KB of English that ships with every Python): the topics in name order, joined; the
last ``--val-fraction`` of the bytes is the validation text; both parts are cut into
non-overlapping blocks of ``--seq-len`` bytes.

Three training runs, each ``--steps`` optimizer steps through ``transformers.Trainer``
with the same initialization, data order, cosine learning-rate schedule (linear warmup)
and AdamW (``fused=True``):

1. **FP**: plain ``torch.optim.AdamW``: the full-precision baseline.
2. **QAT**: ``optimizers=(QuantOptimizer(AdamW(param_groups, fused=True), quantizer,
   ProxPARQ(anneal_start, anneal_end)), scheduler)``: ``--bits`` bits per weight, one
   level set per output channel (row), or per block of ``--block-size`` consecutive
   weights of a row. PARQ's prox map anneals from ``--anneal-start`` to ``--anneal-end``
   (fractions of ``--steps``); after that the weights are hard-quantized. A checkpoint is
   saved through ``Trainer`` at ``--checkpoint-at`` (a fraction of ``--steps``, inside the
   annealing by default, where the latent weights differ most from the model's).
3. **Resume**: a fresh model, optimizer and ``Trainer`` run
   ``trainer.train(resume_from_checkpoint=<that checkpoint>)`` to the end. Checked: the
   ``QuantOptimizer`` state loaded from the checkpoint's ``optimizer.pt`` (``torch.load``
   with ``weights_only=True``, as ``Trainer`` loads it) holds every quantized weight's
   latent copy and levels and ``num_steps``, bitwise as saved; the resumed run logs the
   same training losses as the uninterrupted one after the checkpoint, and ends with the
   same weights and latents, bitwise (``--no-resume`` skips it).

Quantized (the example's choice): the 2-D weights of every attention projection
(``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``) and MLP projection (``gate_proj``,
``up_proj``, ``down_proj``), weight decay ``--weight-decay``. Kept in full precision: the
token embedding (tied to the output layer ``lm_head``, so that is full precision too) and
the RMSNorm weights, no weight decay; the Llama projections have no biases.

Then the QAT model is checked to be on its level grid (at most ``2**bits`` distinct values
per row or block, each a level of the optimizer's level set), exported packed with
``parq.export.save_quantized`` (size report printed), reloaded into a fresh model and
evaluated again. Validation loss (nats per byte), bits per byte and perplexity (per byte)
of the FP model, the QAT model and the reloaded file are printed side by side and written
to ``<out>/llm_qat_<bits>bit_<layout>_<date>[_quick].{md,json}`` (default
``benchmarks/results``), with a chart of the training losses (``.png``, needs matplotlib).

Needs the ``llm`` extra: ``pip install "transformers==5.25.0" "accelerate==1.16.0"``
(``make setup`` installs them; neither replaces the installed torch).

Examples::

    python examples/llm_qat.py                      # 2-bit, per channel (a few minutes)
    python examples/llm_qat.py --bits 4 --block-size 32
    python examples/llm_qat.py --quick              # tiny model, seconds (the test's run)
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parent.parent
try:
    import parq  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(_ROOT))
if str(_ROOT) not in sys.path:  # benchmarks.cli_checks: the checks shared with the benchmarks
    sys.path.append(str(_ROOT))

from benchmarks.cli_checks import (  # noqa: E402
    check_device,
    check_out_dir,
    finite_float,
    optional_module,
)
from parq.export import load_quantized, save_quantized, size_report  # noqa: E402
from parq.optim import ProxPARQ, QuantOptimizer  # noqa: E402
from parq.quant import LSBQuantizer, UnifQuantizer  # noqa: E402

# the `llm` extra of pyproject.toml (and the Makefile's TRANSFORMERS_VERSION / ACCELERATE_VERSION)
PINS = '"transformers==5.25.0" "accelerate==1.16.0"'
VOCAB = 256  # byte-level tokens
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT = "The "  # greedy samples of each model start here

# model / run sizes: the default run, and --quick (the test's run); an option given on the
# command line wins over both
DEFAULTS = dict(hidden=128, layers=2, heads=4, intermediate=None, seq_len=128, batch_size=16,
                steps=300, log_every=5, sample_bytes=120)  # fmt: skip
QUICK = dict(hidden=64, layers=2, heads=4, intermediate=None, seq_len=64, batch_size=8,
             steps=24, log_every=2, sample_bytes=40)  # fmt: skip


# -- command line ---------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Sizes default to the normal run; --quick picks a tiny one (any size given "
        "explicitly wins).",
    )
    add = p.add_argument
    add("--bits", type=int, default=2, help="bits per quantized weight, 1..8 (default 2)")
    add(
        "--quantizer",
        choices=("uniform", "lsbq"),
        default="uniform",
        help="level sets: UnifQuantizer (uniform, default) or LSBQuantizer (greedy LSBQ)",
    )
    add(
        "--block-size",
        type=int,
        default=None,
        help="one level set per block of this many consecutive weights of a row (must "
        "divide every quantized weight's width); default: one per row (per channel)",
    )
    add("--steps", type=int, default=None, help="optimizer steps of each run (default 300)")
    add("--batch-size", type=int, default=None, help="blocks per step (default 16)")
    add("--seq-len", type=int, default=None, help="bytes per block = context (default 128)")
    add("--hidden", type=int, default=None, help="hidden size (default 128)")
    add("--layers", type=int, default=None, help="decoder layers (default 2)")
    add("--heads", type=int, default=None, help="attention heads (default 4)")
    add("--intermediate", type=int, default=None, help="MLP size (default 3 x --hidden)")
    add("--lr", type=finite_float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    add(
        "--lr-warmup",
        type=finite_float,
        default=0.05,
        help="linear learning-rate warmup, a fraction of --steps (default 0.05)",
    )
    add(
        "--weight-decay",
        type=finite_float,
        default=0.01,
        help="AdamW weight decay of the quantized weights (the others: none)",
    )
    add(
        "--anneal-start",
        type=finite_float,
        default=0.1,
        help="where PARQ's annealing starts, a fraction of --steps (default 0.1)",
    )
    add(
        "--anneal-end",
        type=finite_float,
        default=0.75,
        help="where the weights become hard-quantized, a fraction of --steps (default 0.75)",
    )
    add(
        "--quant-period",
        type=int,
        default=10,
        help="recompute the level sets every this many steps (default 10)",
    )
    add(
        "--checkpoint-at",
        type=finite_float,
        default=0.5,
        help="save the QAT run's checkpoint here, a fraction of --steps, rounded to a "
        "multiple of --log-every (default 0.5)",
    )
    add("--no-resume", action="store_true", help="skip the resume-from-checkpoint run")
    add(
        "--log-every",
        type=int,
        default=None,
        help="log the training loss every this many steps (default 5)",
    )
    add(
        "--val-fraction",
        type=finite_float,
        default=0.1,
        help="the last fraction of the corpus held out for validation (default 0.1)",
    )
    add(
        "--sample-bytes",
        type=int,
        default=None,
        help="bytes of greedy text each model writes after the prompt (0: none; default 120)",
    )
    add("--seed", type=int, default=0)
    add(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on two idle cores 2 threads step this model about "
        "1.7x faster, on cores shared with other work several times slower)",
    )
    add("--device", default="cpu", help="cpu or cuda")
    add(
        "--quick",
        action="store_true",
        help="tiny run for tests: hidden 64, context 64, batch 8, 24 steps",
    )
    add(
        "--out",
        type=Path,
        default=_ROOT / "benchmarks" / "results",
        help="directory for the results table, JSON and chart (default benchmarks/results)",
    )
    add(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the Trainer checkpoints and the packed file here (default: a temporary "
        "directory, removed at the end)",
    )
    add("--no-progress", action="store_true", help="no progress bars (plain log lines)")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill the sizes and reject bad values with a message naming the argument."""
    for k, v in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.intermediate is None:
        args.intermediate = 3 * args.hidden
    for name in ("steps", "batch_size", "hidden", "layers", "heads", "intermediate",
                 "quant_period", "log_every"):  # fmt: skip
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len < 2:
        p.error(f"--seq-len must be >= 2 (a byte and the next), got {args.seq_len}")
    if args.sample_bytes < 0:
        p.error(f"--sample-bytes must be >= 0, got {args.sample_bytes}")
    if args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    if not 1 <= args.bits <= 8:
        p.error(f"--bits must be in 1..8, got {args.bits}")
    if args.hidden % args.heads or (args.hidden // args.heads) % 2:
        p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads}) with "
                "an even head size (rotary embeddings)")  # fmt: skip
    if args.block_size is not None:
        widths = {"--hidden": args.hidden, "--intermediate": args.intermediate}
        bad = [f"{k} {w}" for k, w in widths.items() if w % max(args.block_size, 1)]
        if args.block_size < 1 or bad:
            p.error(f"--block-size must be >= 1 and divide every quantized weight's width "
                    f"(the rows of the attention and MLP projections are --hidden or "
                    f"--intermediate wide), got {args.block_size} for "
                    f"{', '.join(bad) or 'them'}")  # fmt: skip
    if args.lr <= 0:
        p.error(f"--lr must be > 0, got {args.lr}")
    if args.weight_decay < 0:
        p.error(f"--weight-decay must be >= 0, got {args.weight_decay}")
    if not 0 <= args.lr_warmup < 1:
        p.error(f"--lr-warmup must be in [0, 1), got {args.lr_warmup}")
    if not 0 < args.val_fraction < 0.5:
        p.error(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if not 0 <= args.anneal_start < args.anneal_end <= 1:
        p.error(f"--anneal-start and --anneal-end must satisfy 0 <= start < end <= 1 (fractions "
                f"of --steps), got {args.anneal_start} and {args.anneal_end}")  # fmt: skip
    start, end = anneal_steps(args)
    if end >= args.steps:
        p.error(f"--anneal-end ({args.anneal_end} of {args.steps} steps = step {end}) must end "
                "before the last step, so that the evaluated model is hard-quantized")  # fmt: skip
    if not 0 < args.checkpoint_at < 1:
        p.error(f"--checkpoint-at must be in (0, 1), got {args.checkpoint_at}")
    c = checkpoint_step(args)
    if not 0 < c < args.steps:
        p.error(f"--checkpoint-at {args.checkpoint_at} of {args.steps} steps, rounded to a "
                f"multiple of --log-every {args.log_every}, is step {c}: it must lie inside "
                "the run (more --steps or a smaller --log-every)")  # fmt: skip
    args.device = str(check_device(p, args.device))
    check_out_dir(p, args.out)
    if args.work_dir is not None:
        check_out_dir(p, args.work_dir, "--work-dir")


def anneal_steps(args: argparse.Namespace) -> tuple[int, int]:
    """PARQ's ``(anneal_start, anneal_end)`` in optimizer steps."""
    start = round(args.anneal_start * args.steps)
    return start, max(start + 1, round(args.anneal_end * args.steps))


def checkpoint_step(args: argparse.Namespace) -> int:
    """The QAT run's checkpoint step: on a logging step, so that the logged windows of
    the resumed run and the uninterrupted one are the same steps."""
    return round(args.checkpoint_at * args.steps / args.log_every) * args.log_every


def require_transformers() -> None:
    """Exit 2 with the install command if the ``llm`` extra is missing (before any work)."""
    missing = [m for m in ("transformers", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"llm_qat.py: needs {' and '.join(missing)} (the llm extra): pip install {PINS}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


# -- data and model ---------------------------------------------------------------------


def encode(text: str) -> torch.Tensor:
    """The byte tokenizer: token ids are the UTF-8 bytes."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode("utf-8", errors="replace")


def load_corpus(seq_len: int, val_fraction: float) -> dict:
    """``pydoc_data.topics`` as train / validation blocks of ``seq_len`` bytes."""
    from pydoc_data.topics import topics

    data = encode("\n\n".join(topics[k] for k in sorted(topics)))
    cut = len(data) - round(val_fraction * len(data))

    def blocks(t: torch.Tensor) -> torch.Tensor:
        return t[: len(t) // seq_len * seq_len].view(-1, seq_len)

    train, val = blocks(data[:cut]), blocks(data[cut:])
    return {"train": train, "val": val, "bytes": len(data), "topics": len(topics),
            "train_bytes": cut, "val_bytes": len(data) - cut}  # fmt: skip


class Blocks(torch.utils.data.Dataset):
    """Causal-LM examples for ``Trainer``: the model shifts the labels itself."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def build_model(args: argparse.Namespace, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(args.device)


def param_groups(model: torch.nn.Module, args: argparse.Namespace, qat: bool) -> list[dict]:
    """The attention / MLP projection weights (quantized with ``qat``) and the rest."""
    quantized, other = [], []
    for name, p in model.named_parameters():  # the tied lm_head is listed once, as embedding
        is_q = p.dim() == 2 and name.rsplit(".", 2)[-2] in QUANTIZED
        (quantized if is_q else other).append(p)
    group = {"params": quantized, "weight_decay": args.weight_decay}
    if qat:
        group["quant_bits"] = args.bits
        if args.block_size is not None:
            group["quant_block_size"] = args.block_size
    return [group, {"params": other, "weight_decay": 0.0}]


def make_optimizers(model: torch.nn.Module, args: argparse.Namespace, qat: bool):
    """``(optimizer, scheduler)`` for ``Trainer(optimizers=...)``."""
    from transformers import get_cosine_schedule_with_warmup

    base = torch.optim.AdamW(param_groups(model, args, qat), lr=args.lr, fused=True)
    opt = base
    if qat:
        start, end = anneal_steps(args)
        quantizer = UnifQuantizer() if args.quantizer == "uniform" else LSBQuantizer()
        opt = QuantOptimizer(base, quantizer, ProxPARQ(start, end), quant_period=args.quant_period,
                             quant_per_channel=True)  # fmt: skip
    warmup = round(args.lr_warmup * args.steps)
    return opt, get_cosine_schedule_with_warmup(opt, warmup, args.steps)


# -- training -----------------------------------------------------------------------------


def callbacks(save_at: int | None = None, check=None) -> list:
    """``Trainer`` callbacks: a checkpoint at step ``save_at`` only; ``check(step)`` called
    before the first step the Trainer takes (a resumed run: after loading its checkpoint)."""
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == save_at:
                control.should_save = True

    class FirstStep(TrainerCallback):
        done = False

        def on_step_begin(self, args, state, control, **kwargs):
            if not self.done:
                self.done = True
                check(state.global_step)

    return ([SaveAt()] if save_at else []) + ([FirstStep()] if check else [])


def train(model, optimizers, args: argparse.Namespace, run_dir: Path, label: str,
          callbacks_=(), resume: Path | None = None) -> dict:  # fmt: skip
    """One ``Trainer`` run; returns its loss log and time."""
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(
        output_dir=str(run_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        logging_steps=args.log_every,
        save_strategy="no",  # the checkpoint is the SaveAt callback's
        report_to="none",
        use_cpu=args.device == "cpu",
        seed=args.seed,
        data_seed=args.seed,
        dataloader_num_workers=0,
        disable_tqdm=args.no_progress,
        max_grad_norm=1.0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=args.train_set,
                      optimizers=optimizers, callbacks=list(callbacks_))  # fmt: skip
    what = f"resumed from {resume.name}" if resume else f"{args.steps} steps"
    print(f"\n== {label}: Trainer, {what} ==", flush=True)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - t0
    log = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {"train_s": seconds, "loss_log": log, "global_step": trainer.state.global_step}


@torch.no_grad()
def validation_loss(model, blocks: torch.Tensor, args: argparse.Namespace) -> float:
    """Mean negative log-likelihood (nats) of every validation byte after the first of
    its block."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(blocks), 4 * args.batch_size):
        x = blocks[i : i + 4 * args.batch_size].to(args.device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1),
                               reduction="sum").item()  # fmt: skip
        count += x[:, 1:].numel()
    model.train()
    return nll / count


@torch.no_grad()
def sample(model, args: argparse.Namespace) -> str:
    """``--sample-bytes`` bytes of greedy continuation of :data:`PROMPT`."""
    model.eval()
    ids = encode(PROMPT)[None].to(args.device)
    for _ in range(args.sample_bytes):
        nxt = model(input_ids=ids[:, -args.seq_len :]).logits[0, -1].argmax()
        ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    model.train()
    return decode(ids[0].cpu())


def metrics(loss: float) -> dict:
    return {"val_loss": loss, "bits_per_byte": loss / math.log(2), "perplexity": math.exp(loss)}


# -- checks -------------------------------------------------------------------------------


def quantized_params(opt: QuantOptimizer) -> list[torch.Tensor]:
    return [p for g in opt.regularized_param_groups() for p in g["params"]]


def level_grid(model, opt: QuantOptimizer, args: argparse.Namespace) -> dict:
    """Each quantization group (row or block) of each quantized weight: its distinct
    values, all of them levels of the optimizer's level set for that group."""
    names = {id(p): n for n, p in model.named_parameters()}
    most, groups, off_grid = 0, 0, []
    for p in quantized_params(opt):
        Q = opt.state[p]["quants"]  # (groups, K): one level set per row or block
        rows = p.detach().reshape(Q.size(0), -1)
        groups += rows.size(0)
        most = max(most, max(len(torch.unique(r)) for r in rows))
        if not (rows[:, :, None] == Q[:, None, :].to(rows.dtype)).any(-1).all():
            off_grid.append(names[id(p)])
    return {"groups": groups, "max_distinct_per_group": most, "K": 2**args.bits,
            "levels_per_group": Q.size(-1), "off_grid": off_grid}  # fmt: skip


def restored_check(opt: QuantOptimizer, checkpoint: Path, step: int, out: dict) -> None:
    """Called before the resumed run's first step: compare the live QuantOptimizer state
    with the checkpoint's ``optimizer.pt`` (read as ``Trainer`` reads it)."""
    saved = torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    params = [p for g in opt.param_groups for p in g["params"]]
    quantized = {id(p) for p in quantized_params(opt)}
    equal, latents, keys = True, 0, set()
    for i, p in enumerate(params):
        for k, v in saved["state"].get(i, {}).items():
            mine = opt.state[p].get(k)
            keys.add(k)
            same = mine is not None and torch.equal(torch.as_tensor(mine).cpu(), v)
            equal &= same
            latents += k == "latent" and id(p) in quantized and same
    groups = [{k: g[k] for k in ("num_steps", "cumu_lr") if k in g} for g in saved["param_groups"]]
    live = [{k: g[k] for k in ("num_steps", "cumu_lr") if k in g} for g in opt.param_groups]
    out.update(
        trainer_step=step,
        state_keys=sorted(keys),
        state_equal=equal,
        latents_restored=latents,
        quantized_params=len(quantized),
        num_steps_saved=saved["param_groups"][0].get("num_steps"),
        num_steps_restored=opt.param_groups[0].get("num_steps"),
        groups_equal=groups == live,
    )


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def latents(opt: QuantOptimizer) -> dict[str, torch.Tensor]:
    return {str(i): opt.state[p]["latent"].clone() for i, p in enumerate(quantized_params(opt))}


# -- export -------------------------------------------------------------------------------


def export(model, opt: QuantOptimizer, args: argparse.Namespace, work: Path, qat_loss: float):
    """Packed file (float16 levels), size report, reload into a fresh model, evaluate;
    float32 levels must reload bitwise."""
    path = work / f"llm_qat_{args.bits}bit.safetensors"
    result = save_quantized(path, model, opt)
    report = size_report(model, opt)
    print(f"\n== packed export: {path.name} ==\n{report}", flush=True)
    fresh = build_model(args, seed=args.seed + 1)
    load_quantized(path, fresh)
    reloaded = validation_loss(fresh, args.val_blocks, args)
    exact = work / f"llm_qat_{args.bits}bit_fp32levels.safetensors"
    save_quantized(exact, model, opt, levels_dtype=torch.float32)
    load_quantized(exact, fresh)
    bitwise = same_tensors(fresh.state_dict(), model.state_dict())
    if not bitwise or result.max_moved > 0:
        raise AssertionError(f"the packed model differs from the trained one (bitwise with "
                             f"float32 levels: {bitwise}, moved {result.max_moved})")  # fmt: skip
    exact_loss = validation_loss(fresh, args.val_blocks, args)
    return {
        "file": path.name,
        "float32_bytes": report.float32_bytes,
        "packed_file_bytes": report.file_bytes,
        "zlib_bytes": report.zlib_bytes,
        "quantized_weights": report.quantized_numel,
        "quantized_dense_bytes": sum(p.dense_bytes for p in report.params),
        "packed_weight_bytes": report.packed_bytes,
        "bits_per_weight": report.bits_per_weight,
        "other_bytes": report.other_bytes,
        "levels_dtype": report.levels_dtype,
        "reloaded": metrics(reloaded),
        "bitwise_with_float32_levels": bitwise,
        "float32_levels_val_loss_equal": exact_loss == qat_loss,
    }


# -- report -------------------------------------------------------------------------------


def label(args: argparse.Namespace) -> str:
    layout = "per channel" if args.block_size is None else f"blocks of {args.block_size}"
    return f"{args.bits}-bit {args.quantizer} PARQ, {layout}"


def tables(payload: dict) -> str:
    r, args = payload["results"], payload["config"]
    fp, qat, ex = r["fp"], r["qat"], r.get("export")
    lines = [
        f"Validation: {payload['data']['val_blocks']} blocks of {args['seq_len']} bytes "
        f"(nats and bits per byte, perplexity per byte); {args['steps']} steps of "
        f"{args['batch_size']} blocks per run.",
        "",
        "| model | weights | val loss | bits / byte | perplexity | vs FP | train s |",
        "|---|---|---|---|---|---|---|",
    ]

    def row(name, weights, m, secs):
        ratio = m["perplexity"] / fp["metrics"]["perplexity"]
        delta = "-" if m is fp["metrics"] else f"{ratio:.3f}x"
        secs = "-" if secs is None else f"{secs:.1f}"
        lines.append(f"| {name} | {weights} | {m['val_loss']:.4f} | {m['bits_per_byte']:.3f} | "
                     f"{m['perplexity']:.3f} | {delta} | {secs} |")  # fmt: skip

    row("FP (AdamW)", "float32", fp["metrics"], fp["train_s"])
    row(f"QAT: {payload['label']}", "its quantized weights", qat["metrics"], qat["train_s"])
    if ex:
        row("packed file, reloaded", f"{ex['levels_dtype']} levels", ex["reloaded"], None)
        lines += [
            "",
            "| packed export | bytes |",
            "|---|---|",
            f"| the model in float32 | {ex['float32_bytes']:,} |",
            f"| its {ex['quantized_weights']:,} quantized weights: dense -> packed | "
            f"{ex['quantized_dense_bytes']:,} -> {ex['packed_weight_bytes']:,}, "
            f"**{ex['bits_per_weight']:.3f} bits per weight** (levels included) |",
            f"| the packed file (embedding and norms in float32: {ex['other_bytes']:,} B) | "
            f"{ex['packed_file_bytes']:,} ({ex['float32_bytes'] / ex['packed_file_bytes']:.1f}x "
            "smaller) |",
            f"| zlib of the packed file | {ex['zlib_bytes']:,} |",
        ]
    res = r.get("resume")
    if res:
        lines += [
            "",
            f"Resume: checkpoint at step {res['checkpoint_step']} (Trainer's optimizer.pt, "
            f"scheduler.pt, model.safetensors, rng_state.pth); a fresh model, optimizer and "
            f"Trainer resumed from it.",
            "",
            "| check | result |",
            "|---|---|",
            f"| QuantOptimizer state after loading (keys {', '.join(res['state_keys'])}) equals "
            f"the checkpoint's | {res['state_equal']} |",
            f"| latent copies restored | {res['latents_restored']} of "
            f"{res['quantized_params']} quantized weights |",
            f"| num_steps saved -> restored | {res['num_steps_saved']} -> "
            f"{res['num_steps_restored']} |",
            f"| logged losses after step {res['checkpoint_step']} equal to the uninterrupted "
            f"run's | {res['losses_equal']} ({res['losses_compared']} logs, max difference "
            f"{res['max_loss_diff']:.2g}) |",
            f"| final weights and latents bitwise equal to the uninterrupted run's | "
            f"{res['weights_equal'] and res['latents_equal']} |",
        ]
    grid = qat["level_grid"]
    lines += [
        "",
        f"Level grid: {grid['groups']} quantization groups, at most "
        f"{grid['max_distinct_per_group']} distinct values each (K = {grid['K']}); "
        f"off the optimizer's levels: {grid['off_grid'] or 'none'}.",
    ]
    if fp.get("sample"):
        lines += ["", "Greedy samples (prompt " + json.dumps(PROMPT) + "):", ""]
        for name, s in (("FP", fp["sample"]), ("QAT", qat["sample"])):
            lines.append(f"- {name}: `{json.dumps(s)[1:-1]}`")
    return "\n".join(lines)


def chart(payload: dict, path: Path, plt) -> None:
    r = payload["results"]
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for key, name, style in (("fp", "FP (AdamW)", "-"), ("qat", payload["label"], "-")):
        steps, losses = zip(*r[key]["loss_log"], strict=True)
        ppl = r[key]["metrics"]["perplexity"]
        ax.plot(steps, losses, style, label=f"{name}: val perplexity {ppl:.2f}")
    if r.get("resume"):
        steps, losses = zip(*r["resume"]["loss_log"], strict=True)
        ax.plot(steps, losses, "k.", ms=4, label="QAT resumed from the checkpoint")
        ax.axvline(r["resume"]["checkpoint_step"], color="k", ls=":", lw=1)
    start, end = r["qat"]["anneal_steps"]
    ax.axvspan(start, end, color="tab:orange", alpha=0.1, label="PARQ annealing (then hard)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (nats / byte)")
    ax.set_title("Byte-level Llama on pydoc_data.topics: FP vs QAT (Trainer)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    require_transformers()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: say so to the hub
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    plt = optional_module("matplotlib", "no chart")
    if plt is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    torch.set_num_threads(args.threads)
    import accelerate
    import transformers

    transformers.logging.set_verbosity_warning()
    corpus = load_corpus(args.seq_len, args.val_fraction)
    args.train_set, args.val_blocks = Blocks(corpus["train"]), corpus["val"]
    model = build_model(args, args.seed)
    n_q = sum(p.numel() for p in param_groups(model, args, True)[0]["params"])
    n_all = sum(p.numel() for p in model.parameters())
    print(
        f"corpus: pydoc_data.topics, {corpus['topics']} topics, {corpus['bytes']:,} bytes -> "
        f"{len(corpus['train'])} train / {len(corpus['val'])} validation blocks of "
        f"{args.seq_len} bytes\nmodel: Llama, hidden {args.hidden}, {args.layers} layers, "
        f"{args.heads} heads, MLP {args.intermediate}, {n_all:,} parameters ({n_q:,} "
        f"quantized: {label(args)}); {args.steps} steps per run, {threads()}, torch "
        f"{torch.__version__}, transformers {transformers.__version__}",
        flush=True,
    )
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="llm_qat_")
        work = Path(tmp.name)
    else:
        work = args.work_dir
    t_all = time.perf_counter()
    try:
        results = run_all(model, args, work)
    finally:
        if tmp is not None:
            tmp.cleanup()
    total_s = time.perf_counter() - t_all

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    layout = "channel" if args.block_size is None else f"block{args.block_size}"
    stem = args.out / f"llm_qat_{args.bits}bit_{layout}_{date}{'_quick' if args.quick else ''}"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("train_set", "val_blocks")}  # fmt: skip
    payload = {
        "date_utc": date,
        "label": label(args),
        "config": config,
        "environment": environment(transformers.__version__, accelerate.__version__),
        "model": {
            "parameters": n_all,
            "quantized": n_q,
            "quantized_modules": list(QUANTIZED),
            "full_precision": "embedding (tied lm_head), RMSNorm weights",
        },  # fmt: skip
        "data": {k: v for k, v in corpus.items() if k not in ("train", "val")}
        | {"train_blocks": len(corpus["train"]), "val_blocks": len(corpus["val"])},
        "results": results,
        "total_s": total_s,
    }
    text = tables(payload)
    print("\n" + text + f"\n\ntotal {total_s:.1f} s")
    command = " ".join(sys.argv[1:] if argv is None else argv)
    stem.with_suffix(".md").write_text(
        f"LLM QAT example ({date}, {payload['environment']['cpu']}, "
        f"{threads()}, total {total_s:.0f} s), command: "
        f"`python examples/llm_qat.py {command}`\n\n" + text + "\n"
    )
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    written = "md,json"
    if plt is not None:
        chart(payload, stem.with_suffix(".png"), plt)
        written += ",png"
    print(f"\nwrote {stem}.{{{written}}}")
    return 0


def run_all(model, args: argparse.Namespace, work: Path) -> dict:
    """The FP run, the QAT run (checkpoint at :func:`checkpoint_step`), the resumed run,
    the checks and the export."""
    fp_opt = make_optimizers(model, args, qat=False)
    fp = train(model, fp_opt, args, work / "fp", "FP")
    fp["metrics"] = metrics(validation_loss(model, args.val_blocks, args))
    fp["sample"] = sample(model, args) if args.sample_bytes else ""
    print(f"FP: validation perplexity {fp['metrics']['perplexity']:.3f}", flush=True)

    ckpt_step = checkpoint_step(args) if not args.no_resume else None
    model = build_model(args, args.seed)  # the same initialization as the FP run
    opt, sched = make_optimizers(model, args, qat=True)
    qat = train(model, (opt, sched), args, work / "qat", label(args), callbacks(ckpt_step))
    qat["anneal_steps"] = anneal_steps(args)
    qat["metrics"] = metrics(validation_loss(model, args.val_blocks, args))
    qat["sample"] = sample(model, args) if args.sample_bytes else ""
    qat["level_grid"] = grid = level_grid(model, opt, args)
    qat["step_paths"] = [f"{g.path}{f' ({g.reason})' if g.reason else ''}"
                         for g in opt.step_paths]  # fmt: skip
    print(f"QAT: validation perplexity {qat['metrics']['perplexity']:.3f}; at most "
          f"{grid['max_distinct_per_group']} distinct values per group (K = {grid['K']})",
          flush=True)  # fmt: skip
    if grid["off_grid"] or grid["max_distinct_per_group"] > grid["K"]:
        raise AssertionError(f"QAT weights off the level grid: {grid}")
    results = {"fp": fp, "qat": qat}

    if ckpt_step is not None:
        results["resume"] = resume(model, opt, qat, args, work, ckpt_step)
    results["export"] = export(model, opt, args, work, qat["metrics"]["val_loss"])
    return results


def resume(model, opt, qat: dict, args: argparse.Namespace, work: Path, ckpt_step: int) -> dict:
    """A fresh model / optimizer / Trainer resumed from the QAT run's checkpoint, compared
    with the uninterrupted run."""
    checkpoint = work / "qat" / f"checkpoint-{ckpt_step}"
    model2 = build_model(args, args.seed + 2)  # overwritten by the checkpoint's weights
    opt2, sched2 = make_optimizers(model2, args, qat=True)
    restored = {"checkpoint_step": ckpt_step}
    hook = callbacks(check=lambda step: restored_check(opt2, checkpoint, step, restored))
    run = train(model2, (opt2, sched2), args, work / "resumed", "QAT resumed", hook, checkpoint)
    print("(lm_head.weight is tied to the embedding: it is not stored on its own, so a missing "
          "lm_head key in the checkpoint is expected)", flush=True)  # fmt: skip
    before = dict(qat["loss_log"])
    after = [(s, loss) for s, loss in run["loss_log"] if s > ckpt_step]
    diffs = [abs(loss - before[s]) for s, loss in after if s in before]
    restored.update(
        loss_log=after,
        losses_compared=len(diffs),
        max_loss_diff=max(diffs, default=math.nan),
        losses_equal=bool(diffs) and len(diffs) == len(after) and max(diffs) == 0.0,
        weights_equal=same_tensors(model2.state_dict(), model.state_dict()),
        latents_equal=same_tensors(latents(opt2), latents(opt)),
        train_s=run["train_s"],
        final_step=run["global_step"],
    )
    ok = (restored["state_equal"] and restored["trainer_step"] == ckpt_step
          and restored["latents_restored"] == restored["quantized_params"])  # fmt: skip
    print(f"resume: state restored {ok}, losses after step {ckpt_step} equal "
          f"{restored['losses_equal']} (max difference {restored['max_loss_diff']:.2g}), "
          f"final weights equal {restored['weights_equal']}", flush=True)  # fmt: skip
    return restored


def threads() -> str:
    n = torch.get_num_threads()
    return f"{n} thread{'s' if n != 1 else ''}"


def environment(transformers_version: str, accelerate_version: str) -> dict:
    from benchmarks.cpu_info import cpu_model

    return {"cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers_version, "accelerate": accelerate_version,
            "python": sys.version.split()[0]}  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
