"""Every default of the orchestrator, in one place."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PIPELINES_FILE = "pipelines.toml"
OUT_DIR = "out"  # relative to the pipelines file
WORK_DIR_NAME = ".cuepipe-work"  # per-job work folders live under <out>/<this>/<job id>

STAGE_TIMEOUT = 3600.0  # seconds for one stage attempt
STALL_TIMEOUT = 120.0  # seconds without any Event before a stage counts as hung (0: off)
STAGE_RETRIES = 0

KILL_GRACE = 3.0  # seconds between the polite stop (TERM / CTRL_BREAK) and the hard kill
POLL_INTERVAL = 0.05  # seconds the launcher waits for an Event before checking the worker
STDERR_TAIL_LINES = 20  # lines of a failed stage's log carried in its failed Event
RECEIVE_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF for Event sockets: the default loses bursts
MAX_DATAGRAM = 65536

DEMO_PIPELINE = "matte"  # the embedded default main job (`cuepipe demo`)
DEMO_MODEL = "rvm_mobilenetv3_fp32"

# cuepipe serve
DAEMON_HOST = "127.0.0.1"  # locked down: other addresses need an allow-list
DAEMON_PORT = 9000
MAX_QUEUE = 100  # queued jobs before `queue_full`
MAX_COMMAND_BYTES = 16384  # larger command datagrams are counted and refused
HEARTBEAT_INTERVAL = 1.0
SLOTS = {"cpu": 1, "gpu": 1}  # concurrent jobs per resource
RESOURCE = "cpu"  # a pipeline's resource unless it says otherwise
WORKER_MAX_JOBS = 200  # a resident worker is recycled after this many jobs ...
WORKER_MAX_RSS = 4 << 30  # ... or when it holds more memory than this (bytes)
