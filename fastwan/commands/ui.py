"""``fastwan ui``: the Gradio web page (generate, and compare teacher vs student)."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from fastwan.commands.generate import add_runtime_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ui",
        help="web UI: type a prompt, watch the video; compare teacher and student",
        description=(
            "Serve a Gradio page that generates videos with --model (default: the shipped toy "
            "student) and compares it with --teacher (default: the toy teacher) on the same "
            "prompt and seed. Binds to 127.0.0.1 unless --host says otherwise."
        ),
    )
    p.add_argument(
        "--model",
        default=None,
        help="student: pipeline folder, hub repo id or preset name (default: the toy student)",
    )
    p.add_argument(
        "--teacher",
        default=None,
        help="teacher for compare mode (default: the toy teacher when --model is not given; "
        "otherwise compare mode is off)",
    )
    p.add_argument(
        "--toy",
        choices=("t2v", "i2v"),
        default=None,
        help="without --model: the shipped toy text-to-video pair (t2v, the default) or the "
        "image-to-video pair (i2v: an image-to-video tab, and compare with an image)",
    )
    p.add_argument("--preset", default=None, help="the model's preset (default: recognised)")
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="a diffusers-format Wan LoRA (.safetensors file or fastwan export folder) the "
        "page offers for the student, by name, starting at SCALE (default 1); repeatable",
    )
    p.add_argument("--teacher-preset", default=None, help="the teacher's preset")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--max-frames", type=int, default=None, help="cap on frames (default: the model's)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        help="cap on width x height (default: the model's native size)",
    )
    p.add_argument("--queue-size", type=int, default=16, help="requests that may wait (default 16)")
    p.add_argument("--examples", type=Path, default=None, help="example prompts, one a line")
    add_runtime_arguments(
        p,
        "keep the models on the CPU and move each component to the GPU for its stage "
        "(a teacher and a student that do not fit side by side)",
    )
    p.add_argument(
        "--max-sequence-length", type=int, default=None, help="default: the model's text length"
    )
    p.set_defaults(func=run)


def toy_model(role: str) -> str:
    """The shipped toy model folder for ``role`` ("student", "teacher", "i2v-student", ...),
    or a ValueError asking for --model / --teacher where the toy world is not available."""
    flag = "--model" if role.endswith("student") else "--teacher"
    try:
        from fastwan.toy.assets import toy_model_path
    except ImportError as err:
        if not (err.name or "").startswith("fastwan.toy"):
            raise
        raise ValueError(
            f"the shipped toy {role} is not available in this install (fastwan.toy.assets is "
            f"missing); pass {flag} PATH_OR_ID (a Diffusers-format Wan folder)"
        ) from err
    try:
        return str(toy_model_path(role))
    except ValueError as err:
        raise ValueError(
            f"{err}; or pass {flag} PATH_OR_ID (a Diffusers-format Wan folder)"
        ) from err


def toy_examples(count: int = 4) -> list[str]:
    """A few prompts of the toy world's grammar (what the toy models understand), each
    attribute cycling through its values so that the examples differ in all of them."""
    from fastwan.toy import world

    values = list(world.ATTRIBUTES.values())
    return [
        world.canonical_prompt(world.Combo(*(v[i % len(v)] for v in values))) for i in range(count)
    ]


def check_args(args: argparse.Namespace) -> None:
    """The flags' values, or a ValueError naming the flag and the fix."""
    if not 1 <= args.port <= 65535:
        raise ValueError(f"--port must be in [1, 65535], got {args.port}")
    for flag, value in (
        ("--max-frames", args.max_frames),
        ("--max-pixels", args.max_pixels),
        ("--max-sequence-length", args.max_sequence_length),
    ):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.queue_size < 1:
        raise ValueError(f"--queue-size must be >= 1, got {args.queue_size}")
    if not args.host.strip():
        raise ValueError("--host must not be empty (e.g. 127.0.0.1)")
    if args.toy is not None and args.model is not None:
        raise ValueError("--toy picks the shipped toy models: pass it without --model")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While inside: SIGTERM and SIGINT raise ``KeyboardInterrupt`` in the main thread, so
    Gradio's serving loop stops and the ``finally`` blocks clean up (SIGTERM's default is to
    die on the spot, leaving the temporary video folder). A repeated signal while stopping
    is ignored, so it cannot cut the cleanup short; a signal the parent set to be ignored
    stays ignored. The previous handlers are restored on the way out. A no-op off the main
    thread (only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def on_signal(signum: int, frame) -> None:
        nonlocal stopping
        if stopping:
            return
        stopping = True
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    previous = {}
    for sig in signals:
        handler = signal.getsignal(sig)
        if handler is not signal.SIG_IGN:
            previous[sig] = handler
            signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace) -> int:
    from fastwan.commands.generate import parse_loras, read_prompts
    from fastwan.ui.app import FastWanUI, LazyModel, build_app, launch

    check_args(args)
    examples = read_prompts(args.examples) if args.examples is not None else None
    loras = parse_loras(args.lora, 1.0)  # each file checked before any model loads
    use_toy = args.model is None
    toy = "i2v-" if args.toy == "i2v" else ""  # the toy roles' prefix (choices.TOY_ROLES)

    def loader(preset):
        def load(source: str):
            from fastwan.pipeline import VideoGenerator

            print(f"loading {source} ...", file=sys.stderr)
            return VideoGenerator.from_pretrained(
                source,
                preset=preset,
                backend=args.vsa_backend,
                device=args.device,
                dtype=args.dtype,
                cpu_offload=args.cpu_offload,
                compile=args.compile or False,
                vae_tiling=args.vae_tiling,
            )

        return load

    student = LazyModel(
        "student", toy_model(toy + "student") if use_toy else args.model, loader(args.preset)
    )
    teacher = None
    if args.teacher is not None:
        teacher = LazyModel("teacher", args.teacher, loader(args.teacher_preset))
    elif use_toy:  # looked up on first use: a missing toy teacher is a message in the page
        teacher = LazyModel(
            "teacher", lambda: toy_model(toy + "teacher"), loader(args.teacher_preset)
        )
    if examples is None and use_toy:
        examples = toy_examples()
    # From here on SIGTERM / SIGINT stop the server and remove its videos and temporary
    # folder; atexit does the same on any other way out of the interpreter.
    with stop_on_signals():
        try:
            ui = FastWanUI(
                student,
                teacher,
                max_frames=args.max_frames,
                max_pixels=args.max_pixels,
                vsa_backend=args.vsa_backend,
                max_sequence_length=args.max_sequence_length,
                examples=examples,
                loras=loras,
            )
        except KeyboardInterrupt:  # stopped while the student loaded: nothing written yet
            print("fastwan ui: stopped", file=sys.stderr)
            return 0
        atexit.register(ui.close)
        try:
            app = build_app(ui, queue_size=args.queue_size)
            if not is_loopback(args.host):
                print(
                    f"warning: serving on {args.host}: anyone who can reach it can run the model",
                    file=sys.stderr,
                )
            shown = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 address
            print(
                f"fastwan ui: http://{shown}:{args.port} (Ctrl+C or SIGTERM to stop)",
                file=sys.stderr,
            )
            try:
                launch(app, host=args.host, port=args.port, block=True)  # until a stop signal
            except OSError as err:  # the port is taken, the address is not this machine's
                raise ValueError(
                    f"cannot serve on {shown}:{args.port}: {err}; pass a free --port or "
                    "another --host"
                ) from err
        except KeyboardInterrupt:  # one that came outside Gradio's serving loop
            pass
        finally:
            ui.close()
            atexit.unregister(ui.close)
    print("fastwan ui: stopped; its videos and temporary folder are removed", file=sys.stderr)
    return 0
