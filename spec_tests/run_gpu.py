"""The whole GPU suite in one command, for the device machine: `python3 spec_tests/run_gpu.py [pytest args]`.

1. the NCCL check (spec_tests/gpu_nccl_check.py) under `mpirun -n 2` (2 GPUs; on one GPU with 1 rank, which
   runs NCCLComm's issue/wait/poll path but not the transport, and says so; skipped with the reason without a GPU
   or mpirun), with NCCL's NVLink multicast kept off (NCCL_NVLS_ENABLE=0);
2. the spec tests on the cupy backend (REFIMPL_TEST_BACKENDS=cupy, HYPOTHESIS_PROFILE=ci unless set), with a
   JUnit report from which the per-file summary is read.

Prints passed / failed / skipped per file and exits non-zero when anything failed. Run it from a checkout
installed with `python3 -m pip install --no-deps --no-build-isolation -e .`; when the `cupy` entry point is
not registered it writes the package metadata into the tree (setup.py egg_info) so pytest finds it.
"""
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ)
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    env["REFIMPL_TEST_BACKENDS"] = "cupy"
    env["NCCL_NVLS_ENABLE"] = "0"  # never NVLink multicast on shared hosts
    paths = [ROOT, os.path.join(ROOT, "backends")]
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _file_of(classname):
    """spec_tests.test_x.TestClass -> spec_tests/test_x.py (the longest dotted prefix that is a file)."""
    parts = classname.split(".")
    for i in range(len(parts), 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if os.path.exists(os.path.join(ROOT, path)):
            return path
    return classname


def run_pytest(extra, env):
    """Run the spec tests; return {file: Counter(passed/failed/skipped)} read from the JUnit report."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "spec_tests",
               f"--junitxml={report}", *extra]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        counts = collections.defaultdict(collections.Counter)
        if not os.path.exists(report):
            counts["(pytest)"]["failed"] += 1
            return counts, rc
        for case in ET.parse(report).iter("testcase"):
            name = case.get("file") or _file_of(case.get("classname", "?"))
            if case.find("failure") is not None or case.find("error") is not None:
                counts[name]["failed"] += 1
            elif case.find("skipped") is not None:
                counts[name]["skipped"] += 1
            else:
                counts[name]["passed"] += 1
        return counts, rc


def _gpu_count(env):
    probe = "import cupy; print(cupy.cuda.runtime.getDeviceCount())"
    try:
        return int(subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                  timeout=120).stdout.strip() or 0)
    except Exception:
        return 0


def run_nccl(env, nproc=2, timeout=120):
    """The NCCL check under mpirun; -> (status, detail)."""
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if mpirun is None:
        return "skipped", "no mpirun/mpiexec on PATH"
    gpus = _gpu_count(env)
    if gpus == 0:
        return "skipped", f"needs {nproc} GPUs, found none"
    note = ""
    if gpus < nproc:   # one rank still runs NCCLComm's whole issue/wait/poll path, not the GPU-to-GPU transport
        nproc, note = gpus, f", {gpus} rank(s) only: needs {nproc} GPUs for the transport, found {gpus}"
    cmd = [mpirun, "--allow-run-as-root", "-n", str(nproc), "-x", "NCCL_NVLS_ENABLE", "-x", "PYTHONPATH",
           sys.executable, os.path.join("spec_tests", "gpu_nccl_check.py")]
    print("$", " ".join(cmd), flush=True)
    # output goes straight through, so a hang still shows how far each rank got
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "failed", f"timed out after {timeout} s"
    return ("passed" if proc.returncode == 0 else "failed"), f"rc={proc.returncode}{note}"


def _register_entry_points(env):
    probe = "from refimpl.backend import registered_backends as r; print('cupy' in r())"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True).stdout
    if out.strip() != "True":
        subprocess.call([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "egg_info"],
                        cwd=ROOT, env=env)


def main(argv):
    env = _env()
    _register_entry_points(env)
    nccl_status, nccl_detail = run_nccl(env)
    counts, _ = run_pytest(argv, env)
    print("\n==== GPU suite summary ====")
    total = collections.Counter()
    for name in sorted(counts):
        c = counts[name]
        total.update(c)
        print(f"{name:45s} passed {c['passed']:5d}  failed {c['failed']:4d}  skipped {c['skipped']:4d}")
    print(f"{'spec_tests/gpu_nccl_check.py (mpirun -n 2)':45s} {nccl_status} ({nccl_detail})")
    print(f"{'TOTAL pytest':45s} passed {total['passed']:5d}  failed {total['failed']:4d}  "
          f"skipped {total['skipped']:4d}")
    failed = total["failed"] > 0 or nccl_status == "failed"
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
