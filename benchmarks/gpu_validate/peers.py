"""Step peers: liger-kernel, cut-cross-entropy, TRL and verl from the wheels folder, never
from the network, into a scratch folder that later steps see through PYTHONPATH (optional)."""
import os

from .common import DRY_OK, FAIL, PASS, PEERS, PY, SKIP, TIMEOUT, shown, stopped


def step_peers(ctx, step):
    log = ctx.out / step.log
    folder = ctx.wheels
    wheels = sorted(folder.glob("*.whl")) if folder.is_dir() else []
    with open(log, "w") as f:
        f.write(f"wheels folder: {folder} ({len(wheels)} wheels)\n" +
                "".join(f"  {w.name}\n" for w in wheels))
    if not wheels:
        step.status = SKIP
        step.note = (f"no wheels in {shown(folder)}: " + ", ".join(PEERS) + " not installed "
                     "(their benchmark rows say 'not run')")
        return
    site = ctx.scratch / "site"
    cmd = [PY, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", site, *wheels]
    if ctx.dry:
        cmd.insert(4, "--dry-run")
    rc = ctx.call(step, cmd, log)
    if stopped(step, rc, log, "pip "):
        return
    if ctx.dry:
        step.status, step.note = DRY_OK, f"{len(wheels)} wheels install cleanly (not installed)"
        return
    # Later steps (tests, benchmark workers) see the wheels through PYTHONPATH.
    ctx.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                          ctx.env.get("PYTHONPATH")]))
    probe = ("import importlib, importlib.metadata as m\n"
             "from benchmarks.providers import verl_module\n"
             f"for dist, mod in {PEERS!r}.items():\n"
             "    try:\n"
             "        if mod.startswith('verl.'):\n"
             "            verl_module(mod[len('verl.'):])\n"
             "        else:\n"
             "            importlib.import_module(mod)\n"
             "        print(f'{dist}: {m.version(dist)} importable')\n"
             "    except Exception as e:\n"
             "        print(f'{dist}: not importable ({type(e).__name__}: {e})')\n")
    rc = ctx.call(step, [PY, "-c", probe], log)
    if rc is None:
        step.status = TIMEOUT
        return
    notes, broken = [], []
    found = {ln.split(":")[0]: ln for ln in log.read_text().splitlines()
             if ln.split(":")[0] in PEERS}
    for dist, mod in PEERS.items():
        carried = any(w.name.lower().startswith(dist.replace("-", "_") + "-")
                      for w in wheels)
        line = found.get(dist, f"{dist}: not probed")
        if carried and "not importable" in line:
            broken.append(dist)
        notes.append(line if carried or "not importable" not in line
                     else f"{dist}: not installed (no wheel)")
    step.note = "; ".join(notes)
    step.status = FAIL if rc != 0 or broken else PASS
