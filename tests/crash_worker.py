"""Run by tests/test_crash.py: `refimpl train` that kills itself (SIGKILL, no cleanup) at a chosen point.

    python tests/crash_worker.py MODE SAVE OUT_DIR [train arguments ...]

MODE: where the SAVE-th checkpoint save dies
    mid_optimizer_file   half of an optimizer partition written
    before_manifest      every tensor file written, no manifest yet
    before_latest        the finished tag renamed into place, `latest` not yet updated
    mid_latest           `latest`'s temporary file half written
    none                 no planned crash (the test kills the process at a random moment instead)
"""
import os
import signal
import sys


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def main(mode, save, out, *argv):
    import refimpl.checkpoint as ckpt
    from refimpl.cli import main as cli_main
    target, calls = int(save), {"save": 0}
    real_save_file, real_atomic, real_finish = ckpt.save_file, ckpt._atomic_write_text, ckpt._finish

    def finish(*args, **kw):
        calls["save"] += 1
        return real_finish(*args, **kw)

    def save_file(tensors, path):
        this = calls["save"] + (0 if "model.safetensors" in str(path) else 1)   # partitions come before _finish
        if mode == "mid_optimizer_file" and this == target and "optim_states" in str(path):
            data = b"".join(a.tobytes() for a in tensors.values())
            with open(path, "wb") as f:
                f.write(data[:len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        if mode == "before_manifest" and this == target and "model.safetensors" in str(path):
            real_save_file(tensors, path)
            die()
        return real_save_file(tensors, path)

    def atomic(path, text):
        if calls["save"] == target and mode == "before_latest":
            die()
        if calls["save"] == target and mode == "mid_latest":
            with open(path.parent / f".{path.name}.partial", "w") as f:
                f.write(text[: len(text) // 2])
            die()
        return real_atomic(path, text)

    if mode != "none":
        ckpt.save_file, ckpt._atomic_write_text, ckpt._finish = save_file, atomic, finish
    sys.exit(cli_main(["train", "--no-progress", "--out", out, *argv]))


if __name__ == "__main__":
    main(*sys.argv[1:])
