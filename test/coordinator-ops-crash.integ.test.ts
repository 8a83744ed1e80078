import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, describe, expect, it } from "vitest";
import { repoRoot } from "./support/agent.js";

/**
 * The operation engine killed for real: a process drives an operation over LevelDB and SIGKILLs itself
 * at crash point N (the same mechanism as VMENV_COORDINATOR_CRASH_POINT); a second process on the same
 * store resumes it. Each step acts on a "world" of files, logging every effect: after every crash the
 * operation converges with each effect applied exactly once.
 */
const fixture = join(repoRoot, "packages/coordinator/src/ops/testing/crash-fixture.ts");
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

function run(dir: string, mode: "start" | "resume", n: number) {
  return new Promise<{ code: number | null; signal: string | null; out: string; err: string }>((resolve) => {
    const p = execFile(
      process.execPath,
      [
        "--conditions",
        "source",
        "--import",
        "tsx",
        fixture,
        join(dir, "db"),
        join(dir, "world"),
        mode,
        String(n),
      ],
      { cwd: repoRoot, timeout: 60_000 },
      (_e, out, err) => resolve({ code: p.exitCode, signal: p.signalCode, out, err }),
    );
  });
}

describe("operation engine crash (child process, LevelDB)", () => {
  it("resumes after a SIGKILL at every crash point, applying each step's effect once", async () => {
    const probeDir = await mkdtemp(join(tmpdir(), "vmenv-ops-crash-"));
    dirs.push(probeDir);
    const probe = await run(probeDir, "start", 0);
    expect(probe.code, probe.err).toBe(0);
    const { points } = JSON.parse(probe.out) as { points: number };
    expect(points).toBe(9);
    for (let n = 1; n <= points; n++) {
      const dir = await mkdtemp(join(tmpdir(), "vmenv-ops-crash-"));
      dirs.push(dir);
      const crashed = await run(dir, "start", n);
      expect(crashed.signal, `crash point ${n}: ${crashed.err}`).toBe("SIGKILL");
      const resumed = await run(dir, "resume", 0);
      expect(resumed.code, resumed.err).toBe(0);
      const { op } = JSON.parse(resumed.out) as { op: { state: string; resumeCount: number } };
      expect(op, `crash point ${n}`).toMatchObject({ state: "succeeded", resumeCount: 1 });
      const log = (await readFile(join(dir, "world", "log"), "utf8")).trim().split("\n");
      expect(log, `crash point ${n}`).toEqual(["+a", "+b", "+c"]);
    }
  });
});
