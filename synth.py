"""A synthetic long-video task, written as the public sets are published, so every stage runs end to end
on a CPU on the same reading path as real data.

A video is a run of coloured scenes (solid colours with pixel noise, real H.264 mp4 files); each has one
question that needs the whole video: how many scenes are red, which colour comes right after the blue
scene, what colour is the first or the last scene. The records are LongVideo-Reason's (problem, options
in the problem, reasoning, <answer> tags, videos/...), with `duration` and `category` labels for eval's
breakdowns; train.jsonl and test.jsonl share no video. --images and --texts add image questions (a
picture of one colour) and text questions (arithmetic over numbers in the prompt) for the mixed task.

Run it:
    python synth.py --out data/synth --n 200 --seed 0                   # videos/, train.jsonl, test.jsonl
    python synth.py --out data/mixed --n 200 --images 100 --texts 100   # + image and text questions
"""

import argparse
import json
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image
from tqdm import tqdm

import data
import errors

PALETTE = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220),
           "yellow": (220, 220, 30), "magenta": (220, 30, 220), "cyan": (30, 220, 220)}
QUESTION_TYPES = ("count", "after", "first", "last")


def plan_scenes(rng: np.random.Generator, min_scenes: int, max_scenes: int) -> list[str]:
    """The colour of each scene; neighbouring scenes always differ, so every cut is visible."""
    scenes = [str(rng.choice(list(PALETTE)))]
    for _ in range(int(rng.integers(min_scenes, max_scenes + 1)) - 1):
        scenes.append(str(rng.choice([c for c in PALETTE if c != scenes[-1]])))
    return scenes


def scene_frames(scenes: list[str], frames_per_scene: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """The video as frames uint8 [T, size, size, 3]: solid colours plus per-pixel noise (+-12), enough
    that the encoder has real work to do but far less than the distance between palette colours."""
    colours = np.repeat(np.array([PALETTE[s] for s in scenes], dtype=np.int16), frames_per_scene, axis=0)
    noise = rng.integers(-12, 13, size=(len(colours), size, size, 3), dtype=np.int16)
    return np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8)


def write_mp4(path, frames, fps: float, crf: int = 18) -> None:
    """Write RGB frames (uint8 [T, H, W, 3], H and W even) as an H.264 (yuv420p) mp4."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            container.mux(stream.encode(picture))
        container.mux(stream.encode())  # flush the frames the encoder still holds


def _scene_list(numbers: list[int]) -> str:
    """[1] -> "scene 1"; [1, 4] -> "scenes 1 and 4"; [1, 3, 5] -> "scenes 1, 3 and 5"."""
    if len(numbers) == 1:
        return f"scene {numbers[0]}"
    return "scenes " + ", ".join(map(str, numbers[:-1])) + f" and {numbers[-1]}"


def _other_colours(colour: str) -> list[str]:
    return [c for c in PALETTE if c != colour]


def ask(category: str, scenes: list[str], rng: np.random.Generator):
    """One question about the scenes: (problem, truth, distractor pool, last reasoning sentence), or
    None when this plan cannot carry the question (no colour occurs once before the last scene)."""
    if category == "count":
        colour = str(rng.choice(sorted(set(scenes))))
        where = [i + 1 for i, s in enumerate(scenes) if s == colour]
        n = len(where)
        verb = f"there is 1 {colour} scene" if n == 1 else f"there are {n} {colour} scenes"
        return (f"How many scenes are {colour}?", str(n),
                [str(k) for k in range(max(len(scenes), 3) + 1) if k != n],
                f"{colour.capitalize()} appears in {_scene_list(where)}, so {verb}.")
    if category == "after":
        once = [i for i, s in enumerate(scenes[:-1]) if scenes.count(s) == 1]
        if not once:
            return None
        i = int(rng.choice(once))
        truth = scenes[i + 1]
        return (f"Which colour comes right after the {scenes[i]} scene?", truth, _other_colours(truth),
                f"The {scenes[i]} scene is scene {i + 1}; scene {i + 2} after it is {truth}.")
    if category in ("first", "last"):
        truth = scenes[0] if category == "first" else scenes[-1]
        return (f"What colour is the {category} scene?", truth, _other_colours(truth),
                f"The {category} scene is {truth}.")
    raise ValueError(f"unknown question type {category!r}; one of {QUESTION_TYPES}")


def synth_record(index: int, category: str, answer_pos: int, rng: np.random.Generator, args
                 ) -> tuple[dict, np.ndarray]:
    """One record of the synthetic task (a dict in LongVideo-Reason's format, as written to JSONL) and its
    video frames (the video is videos/synth-<index>.mp4 beside the record file).
    `args` carries the flags of main (min_scenes, max_scenes, frames_per_scene, video_fps, size, answers)."""
    while True:  # re-plan until the plan can carry this question type
        scenes = plan_scenes(rng, args.min_scenes, args.max_scenes)
        question = ask(category, scenes, rng)
        if question is not None:
            break
    problem, truth, pool, conclusion = question
    options = [str(o) for o in rng.choice(pool, size=3, replace=False)]
    options.insert(answer_pos, truth)
    walk = " ".join(f"Scene {i + 1} is {s}." for i, s in enumerate(scenes))
    k = len(scenes)
    if args.answers == "open":  # the value itself: a count (numerical) or a colour name (free form)
        problem_type, answer = "numerical" if category == "count" else "general", truth
    else:  # the options embedded in the problem, as the release writes them
        problem += "".join(f"\n{data.option_letter(i)}. {o}" for i, o in enumerate(options))
        problem_type, answer = "multiple choice", data.option_letter(answer_pos)
    record = {  # LongVideo-Reason's fields, then labels for eval's breakdowns and a number for reference
        "problem_id": index, "data_type": "video", "videos": f"videos/synth-{index:06d}.mp4", "problem": problem,
        "problem_type": problem_type, "reasoning": f"{walk} {conclusion}", "answer": f"<answer>{answer}</answer>",
        "duration": "short" if k <= 4 else "medium" if k <= 6 else "long", "category": category,
        "duration_s": k * args.frames_per_scene / args.video_fps,
    }
    return record, scene_frames(scenes, args.frames_per_scene, args.size, rng)


def synth_image_record(index: int, answer_pos: int, rng: np.random.Generator, args) -> tuple[dict, np.ndarray]:
    """An image question of the mixed task: a picture of one palette colour (with the videos' pixel noise)
    and "What colour is the picture?"; the record (LongVideo-Reason's fields, data_type "image") and the
    picture uint8 [size, size, 3] (images/synth-<index>.png beside the record file)."""
    colour = str(rng.choice(list(PALETTE)))
    options = [str(o) for o in rng.choice(_other_colours(colour), size=3, replace=False)]
    return _mixed_record(index, "image", "What colour is the picture?", colour, options, answer_pos,
                         f"The picture is {colour}.", "general", args), scene_frames([colour], 1, args.size, rng)[0]


def synth_text_record(index: int, answer_pos: int, rng: np.random.Generator, args) -> dict:
    """A text question of the mixed task, arithmetic over numbers written in the prompt: "What is 3 + 4?"
    (a numerical answer, or four options of nearby sums)."""
    a, b = (int(x) for x in rng.integers(1, 10, size=2))
    truth = a + b
    options = [str(o) for o in rng.choice([k for k in range(2, 19) if k != truth], size=3, replace=False)]
    return _mixed_record(index, "text", f"What is {a} + {b}?", str(truth), options, answer_pos,
                         f"{a} + {b} = {truth}.", "numerical", args)


def _mixed_record(index: int, data_type: str, problem: str, truth: str, options: list[str], answer_pos: int,
                  reasoning: str, open_type: str, args) -> dict:
    """A record of the mixed task as written to JSONL, in the form --answers asks (see synth_record)."""
    options.insert(answer_pos, truth)
    if args.answers == "open":
        problem_type, answer = open_type, truth
    else:
        problem += "".join(f"\n{data.option_letter(i)}. {o}" for i, o in enumerate(options))
        problem_type, answer = "multiple choice", data.option_letter(answer_pos)
    record = {"problem_id": index, "data_type": data_type, "problem": problem, "problem_type": problem_type,
              "reasoning": reasoning, "answer": f"<answer>{answer}</answer>",
              "category": "picture colour" if data_type == "image" else "arithmetic"}
    if data_type == "image":
        record["images"] = [f"images/synth-{index:06d}.png"]
    return record


def write_task(args) -> int:
    """Write args.n videos and their questions (and args.images image questions, args.texts text questions)
    to args.out/{videos/, images/, train.jsonl, test.jsonl}; each kind is split into train and test alike."""
    if args.min_scenes < 2 or args.max_scenes < args.min_scenes:
        raise errors.UsageError("need 2 <= --min-scenes <= --max-scenes (an 'after' question needs two scenes)")
    if args.size % 2:
        raise errors.UsageError("--size must be even (yuv420p halves the colour resolution)")
    out = Path(args.out)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)  # one stream, so --n 6 writes the first 6 videos of --n 200
    records = []
    for i in tqdm(range(args.n), desc="synth videos"):
        if i % 4 == 0:  # each block of 4 videos has every question type and every answer letter once
            categories, answer_pos = rng.permutation(QUESTION_TYPES), rng.permutation(4)
        record, frames = synth_record(i, str(categories[i % 4]), int(answer_pos[i % 4]), rng, args)
        write_mp4(out / record["videos"], frames, args.video_fps)
        records.append(record)
    kinds = [records, [], []]  # video, image, text questions; one file each, so no split shares a file
    if args.images:
        (out / "images").mkdir(exist_ok=True)
    for i in range(args.images):  # a separate stream after the videos': --images never changes the videos
        record, picture = synth_image_record(args.n + i, i % 4, rng, args)
        Image.fromarray(picture).save(out / record["images"][0])
        kinds[1].append(record)
    kinds[2] = [synth_text_record(args.n + args.images + i, i % 4, rng, args) for i in range(args.texts)]
    parts = {"train": [], "test": []}
    for kind in kinds:
        n_test = round(len(kind) * args.test_frac)
        parts["train"] += kind[:len(kind) - n_test]
        parts["test"] += kind[len(kind) - n_test:]
    for name, part in parts.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
        print(f"wrote {len(part)} records to {out / name}.jsonl")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", required=True, help="output folder (videos/, train.jsonl, test.jsonl)")
    ap.add_argument("--n", type=int, default=200, help="number of videos, one question each")
    ap.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same data")
    ap.add_argument("--min-scenes", type=int, default=3, help="fewest scenes in a video")
    ap.add_argument("--max-scenes", type=int, default=8, help="most scenes in a video")
    ap.add_argument("--frames-per-scene", type=int, default=8, help="frames in each scene")
    ap.add_argument("--video-fps", type=float, default=4.0, help="frame rate of the written videos")
    ap.add_argument("--size", type=int, default=64, help="frame width and height in pixels (even)")
    ap.add_argument("--test-frac", type=float, default=0.2, help="fraction of videos in test.jsonl")
    ap.add_argument("--images", type=int, default=0,
                    help="also write this many image questions (a picture of one colour: which colour?)")
    ap.add_argument("--texts", type=int, default=0,
                    help="also write this many text questions (arithmetic: what is 3 + 4?)")
    ap.add_argument("--answers", choices=["choice", "open"], default="choice",
                    help="choice: four lettered options; open: answer with the colour name or the count "
                         "(no options; the same videos and questions)")
    return write_task(ap.parse_args(argv))


if __name__ == "__main__":
    errors.run_main(main)
