"""What a user sees when a command fails.

The errors this project raises about its input (a damaged checkpoint, a bad record, an unreadable video,
flags that do not fit together) are `UserError`s: their message names the file, the line, the field and
what to do. A script shows one of them as one line on stderr,

    error: runs/init/llm/model-00002-of-00004.safetensors: 1,048,576 bytes, its header says 4,194,304 ...

and exits with code 1; anything else (a bug) keeps its full traceback, and so does a UserError when the
command line has `--debug`. Every script ends with

    if __name__ == "__main__":
        errors.run_main(main)

Under torchrun every rank that loads the same damaged checkpoint fails the same way; the message is printed
once, by the first rank to report (it takes a ticket from the job's key-value store; see `_print_once`).
Ctrl-C ends every rank as interrupted (exit by SIGINT, a shell's 130; see `run_main`).
"""
import json
import os
import signal
import sys
import threading
import time


class UserError(Exception):
    """An error about input a user can fix (a file, a record, a flag); the message says which and how."""


class UsageError(UserError, ValueError):
    """Flags or inputs that do not fit together, e.g. --sp-size 3 with 2 processes."""


def run_main(main) -> None:
    """Run a script's `main()` and exit with its return code (None: 0).

    A UserError prints `error: <message>` (one line, its notes appended) on stderr and exits 1. `--debug`
    anywhere on the command line is taken out before `main` parses it, and lets the traceback through instead.

    An error after a Ctrl-C ends the run as the interrupt it follows. Python drops a KeyboardInterrupt
    raised inside an object's `__del__` (it prints "Exception ignored in ..."): when Ctrl-C lands while, say,
    decord closes a video, that rank goes on to its next collective, finds its peers gone and fails there
    ("Connection closed by peer"). So SIGINT is also noted (`_note_ctrl_c`), and such an error re-raised as
    KeyboardInterrupt: every rank of the job exits by SIGINT.
    """
    debug = "--debug" in sys.argv[1:]
    if debug:
        sys.argv.remove("--debug")
    interrupted = _note_ctrl_c()
    try:
        code = main()
    except Exception as e:
        if interrupted.is_set():
            raise KeyboardInterrupt from e
        if debug or not isinstance(e, UserError):
            raise
        message = "error: " + " ".join("; ".join([str(e), *getattr(e, "__notes__", [])]).splitlines())
        _tell_launcher(message)
        _print_once(message)
        sys.exit(1)
    sys.exit(code)


def _note_ctrl_c() -> threading.Event:
    """An Event that SIGINT sets, beside raising KeyboardInterrupt as Python's own handler does. Only where
    that handler is in place (the main thread; SIGINT not ignored, as in a job started in the background)."""
    interrupted = threading.Event()
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        def on_ctrl_c(signum, frame):
            interrupted.set()
            raise KeyboardInterrupt
        signal.signal(signal.SIGINT, on_ctrl_c)
    return interrupted


def _tell_launcher(message: str) -> None:
    """Under torchrun, put the message in the failure summary the launcher prints when a rank fails (in
    place of its "To enable traceback see ..."): the file it reads a rank's root cause from."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


def _print_once(message: str) -> None:
    """Print the message on stderr, once per torchrun job: the rank that takes the first ticket prints.

    torchrun's launcher keeps a TCP key-value store at MASTER_ADDR:MASTER_PORT for the job's life; adding
    1 to a key is atomic, so exactly one rank reads 1 back. That rank prints, then marks it done; the others
    wait for the mark before they exit, because the launcher ends the whole job (SIGTERM) as soon as one
    rank has exited: a rank that exited at once could get the printer killed between its ticket and its
    print, and nobody would print. A restarted job (--max-restarts) has keys of its own. Without a store
    to ask, or if the printer's mark never comes (it died), a rank prints: twice is better than never.
    """
    store = _job_store()
    if store is None:
        print(message, file=sys.stderr, flush=True)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    # On a new line: the ranks share the terminal, and another may be halfway through a progress bar
    # (transformers' "Loading weights" writes "\r..." with no newline until it ends); one write, so
    # nothing lands inside it.
    message = "\n" + message
    try:
        if store.add(f"error-ticket-{attempt}", 1) == 1:
            print(message, file=sys.stderr, flush=True)
            store.set(f"error-printed-{attempt}", "1")
        else:
            store.wait([f"error-printed-{attempt}"])  # the store's timeout (10 s), then RuntimeError
    except RuntimeError:  # the store went away or the printer never marked: print ourselves
        print(message, file=sys.stderr, flush=True)


def _job_store():
    """The launcher's key-value store under torchrun with more than one rank, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from datetime import timedelta

    import torch.distributed as dist
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=10))
    except (KeyError, ValueError, RuntimeError):
        return None
