"""Runs for the fault tests, each in a process of its own, without paying the imports each
time: this process imports the training code (JAX's backend not yet started, so forking is
safe) and forks one child per run. A child is a whole process: kill -9 and signals reach it
alone. Lines on stdin, JSON: {"prepared": ..., "steps": n, "workdir": dir, "log": file} for a
run of the loop, or {"module": m, "argv": [...], "log": file, "env": {...}, "fsize": bytes} for a
command line (`python -m m argv...`, its stderr to log + ".err"); the reply on stdout is the
child's pid. When a child ends, its exit code is written to log + ".rc"
(negative: killed by that signal)."""

import json
import os
import resource
import runpy
import signal
import sys
import traceback

import rlhf.dpo  # noqa: F401  (every stage's module, imported once here)
import rlhf.grpo  # noqa: F401
import rlhf.ppo  # noqa: F401
import rlhf.reward  # noqa: F401
import tests.rlhf.test_ppo  # noqa: F401  (the reward functions the RL runs call)
import train.pretrain  # noqa: F401
import train.sft  # noqa: F401
from tests.faults import runs
from train import loop

LOGS: dict[int, str] = {}


def reap(signum, frame):
  while True:
    try:
      pid, status = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
      return
    if pid == 0:
      return
    log = LOGS.pop(pid)
    with open(log + ".rc.tmp", "w") as f:
      f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(log + ".rc.tmp", log + ".rc")


def child(request) -> int:
  signal.signal(signal.SIGCHLD, signal.SIG_DFL)
  fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(fd, 1)
  if "module" in request:
    os.dup2(os.open(request["log"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
  else:
    os.dup2(fd, 2)
  try:
    if "module" in request:
      command(request)
    else:
      loop.train(runs.run_config(request["prepared"], request["steps"]), request["workdir"])
    return 0
  except SystemExit as e:  # as the interpreter ends on it
    if e.code is None or isinstance(e.code, int):
      return e.code or 0
    print(e.code, file=sys.stderr)
    return 1
  except BaseException:
    traceback.print_exc()
    return 1
  finally:
    sys.stdout.flush()
    sys.stderr.flush()


def command(request) -> None:
  """`python -m module argv...` in this process, as the interpreter would run it."""
  if request.get("fsize"):  # a disk that fills up: writes past this size fail with EFBIG
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"],) * 2)
  os.environ.update(request["env"])
  sys.argv = [request["module"], *request["argv"]]
  sys.modules.pop(request["module"], None)  # as `python -m`: __main__ is the module's only run
  runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


def main():
  signal.signal(signal.SIGCHLD, reap)
  for line in sys.stdin:
    request = json.loads(line)
    # Held back until the child is on record: it may end before fork returns here.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    pid = os.fork()
    if pid == 0:
      signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
      os._exit(child(request))
    LOGS[pid] = request["log"]
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    print(pid, flush=True)


if __name__ == "__main__":
  main()
