"""Stage 1: chain-of-thought SFT of a VideoLM on long-video QA records.

The target of every record is `<think>reasoning</think><answer>answer</answer>` followed by the end-of-text
token; the loss is the token-mean negative log-likelihood over those response tokens only (the prompt
and the video carry no loss). Long sequences are sharded over the sequence-parallel group (MR-SP,
mrsp.py); the other ranks are data parallel; parameters and optimizer state are sharded with FSDP2.
The plumbing this shares with rl.py (run set-up, FSDP2, checkpoints, metrics, flags) is in train.py.

Run:
    python sft.py --init runs/init --data data/synth/train.jsonl --out runs/sft
    torchrun --nproc-per-node 2 sft.py --init runs/init --data data/synth/train.jsonl --out runs/sft --sp-size 2
Writes OUT/metrics.jsonl, OUT/checkpoint-STEP/ (every --save-every steps) and OUT/final/.
"""
import argparse
import random
import time

import torch

import data
import errors
import model as M
import mrsp
import runs
import train
import video

# ---- SFT ----

def sft_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean negative log-likelihood: -sum(logprobs * mask) / sum(mask).   logprobs, mask: [B, S]."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def response_ids(model: M.VideoLM, record: data.Record) -> list[int]:
    return model.encode_text(data.format_response(record.reasoning, record.answer)) + [model.tokenizer.eos_token_id]


def mix_sampling(mix: list[video.FrameSampling], seed: int, micro_step: int) -> video.FrameSampling:
    """The frame sampling of one micro-batch under --mix-num-frames: drawn from (seed, micro_step) alone,
    so every rank draws the same one and a resumed run draws what the first run drew."""
    return mix[random.Random(seed * 1_000_003 + micro_step).randrange(len(mix))]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=train.HelpFormatter)
    ap.add_argument("--init", required=True, help="checkpoint to start from (python model.py init ...)")
    data.add_data_args(ap, "training records with a `reasoning`")
    ap.add_argument("--out", required=True, help="output folder")
    video.add_sampling_args(ap)
    video.add_prefetch_args(ap)
    ap.add_argument("--mix-num-frames", type=int, nargs="+", default=None, metavar="N",
                    help="train on several frame counts instead of --num-frames: each micro-batch draws one of "
                         "these (the same on every rank, from --seed and the step), so the model sees more "
                         "than one frame count's layout (not with --fps)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps")
    ap.add_argument("--batch-size", type=int, default=8,
                    help="records (one response each) per micro-batch per data-parallel rank; an optimizer step "
                         "trains on batch-size x grad-accum x data-parallel ranks records")
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-5,
                    help="peak learning rate (AdamW); 1e-5 is a usual full fine-tuning rate for a 7B model "
                         "(the tiny model of demo.sh and the tests learns at 1e-3)")
    ap.add_argument("--warmup-steps", type=int, default=10, help="linear warmup steps before cosine decay")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                    help="keep the vision tower and projector fixed, as LongVILA-R1 does in RL: each video is "
                         "encoded once and its embeddings cached. --no-freeze-vision trains them too: every "
                         "SP rank then runs the tower over all frames with autograd, checkpointed per chunk of "
                         "frames (it keeps only their pixels), and the cache is off")
    train.add_cache_args(ap, default=None)
    train.add_run_args(ap, save_every=100)
    args = ap.parse_args(argv)
    if args.mix_num_frames and args.fps is not None:
        ap.error("--mix-num-frames draws frame counts; it cannot be combined with --fps")
    if args.embed_cache is None:
        args.embed_cache = args.freeze_vision
    if args.embed_cache and not args.freeze_vision:
        ap.error("--embed-cache needs --freeze-vision: a trained vision tower would make the cached embeddings stale")
    return args


def main(argv=None):
    args = parse_args(argv)
    ps, out, resume_from = train.start_run(args)

    # ---- model, optimizer ----
    attention = M.default_attn_implementation(train.compute_dtype(ps, args.bf16))
    model = M.VideoLM.load(resume_from or args.init, device=ps.device, attn_implementation=attention)
    model.train()
    if args.freeze_vision:
        model.freeze_vision(dtype=torch.bfloat16 if args.bf16 else None)
    if args.grad_checkpointing:
        model.llm.gradient_checkpointing_enable()
    if ps.sp_size > 1:
        mrsp.enable_ulysses(model, ps.sp_group)
    train.shard_model(model, ps, args.bf16)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start_step = 0
    if resume_from:
        start_step = train.load_trainer_state(resume_from, model, optimizer, ps)["step"]
        if ps.rank == 0:
            print(f"resumed from {resume_from} at step {start_step}")

    records = train.load_training_records(args, ps)
    kinds = sorted({r.data_type for r in records})
    if ps.world_size > 1 and not args.freeze_vision and len(kinds) > 1:
        # a trained vision tower is sharded (FSDP): every rank must run it as often as the others, which a
        # micro-batch of text questions (no run) beside one of videos (a run per 32 frames) would not
        raise errors.UsageError(f"{args.data} mixes {' and '.join(kinds)} questions: with the vision tower training "
                                f"over {ps.world_size} processes (--no-freeze-vision) every rank must run it as often "
                                "as the others; use --freeze-vision, one process, or one kind of record")
    sampling = video.FrameSampling.from_args(args)
    mix = [video.FrameSampling(num_frames=n, max_frames=args.max_frames) for n in args.mix_num_frames or []]
    cache = train.embedding_cache(model, args, ps) if args.embed_cache else None
    prompts = train.VideoPrompts(model, sampling, ps, cache, args.decode_workers)
    log = runs.MetricsLog(out, enabled=ps.rank == 0, resume_step=start_step, report_to=args.report_to)

    # ---- train ----
    from tqdm import tqdm
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=ps.rank != 0,
               desc="sft")
    for step in bar:
        t0 = time.time()
        vision_runs_before, skipped_before = train.count_vision_runs(cache, prompts), prompts.skipped
        waited_before = prompts.reader.waited
        lr = train.lr_at(step, args.steps, args.lr, args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum, tokens = 0.0, 0
        for micro in range(args.grad_accum):
            recs = train.records_for_step(records, step * args.grad_accum + micro, args.batch_size, ps, args.seed)
            if mix:
                prompts.sampling = mix_sampling(mix, args.seed, step * args.grad_accum + micro)
            now = step * args.grad_accum + micro  # this micro-batch's videos, then the next one's, read while it trains
            prompts.prefetch(*[(train.records_for_step(records, m, args.batch_size, ps, args.seed),
                                mix_sampling(mix, args.seed, m) if mix else sampling)
                               for m in range(now, min(now + 2, args.steps * args.grad_accum))])
            with train.autocast(ps, args.bf16):
                recs, embeds = prompts.for_batch(recs, records)
                batch = model.build_sequence_batch(embeds, [response_ids(model, r) for r in recs])
                loss = sft_loss(train.sequence_logprobs(model, batch, ps), batch.loss_mask)
            # SP ranks each hold part of every gradient and FSDP averages over all ranks: scaling by
            # sp_size turns that average into the sum over the SP group and the mean over data parallel.
            (loss * ps.sp_size / args.grad_accum).backward()
            loss_sum += loss.item() / args.grad_accum
            tokens += int(batch.loss_mask.sum())
        grad_norm = train.clip_grad_norm(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm,
               "response_tokens": tokens, "time_s": time.time() - t0}
        row["vision_runs"] = train.count_vision_runs(cache, prompts) - vision_runs_before
        row["skipped_records"] = prompts.skipped - skipped_before
        row["video_wait_s"] = prompts.reader.waited - waited_before
        if mix:
            row["num_frames"] = prompts.sampling.num_frames  # the last micro-batch's
        row.update(train.cache_metrics(cache), **train.reader_counts())
        row = train.reduce_metrics(row, ps, sum_keys=("response_tokens", "vision_runs", "skipped_records",
                                                      *train.CACHE_SUM_KEYS, *train.READER_SUM_KEYS),
                                   max_keys=train.CACHE_MAX_KEYS)
        log.log(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}")
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            train.save_checkpoint(out, step + 1, model, optimizer, ps)

    # ---- finish ----
    weights = train.full_state_dict(model, ps)
    if ps.rank == 0:
        model.save(out / "final", weights)
        runs.plot_metrics(log.path, ["loss", "grad_norm", "lr"], out / "sft_curves.png", f"SFT: {args.data}")
        print(f"wrote {out / 'final'}")
    log.close()
    train.shutdown(ps)


if __name__ == "__main__":
    errors.run_main(main)
