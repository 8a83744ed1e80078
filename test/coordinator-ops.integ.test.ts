import { rm } from "node:fs/promises";
import { afterAll, describe, expect, it } from "vitest";
import { openLevelStore } from "../packages/coordinator/src/store/level.js";
import { cliMain, run } from "./support/agent.js";
import { type RunningCoordinator, startCoordinator } from "./support/coordinator.js";

/** The runner's own VMENV_* variables, unset, so that only what a test passes reaches the CLI. */
const noVmenvEnv: NodeJS.ProcessEnv = Object.fromEntries(
  Object.keys(process.env)
    .filter((k) => k.startsWith("VMENV_"))
    .map((k) => [k, undefined]),
);

describe("coordinator operations across a restart (real process, CLI)", () => {
  let coord: RunningCoordinator | undefined;
  const dirs: string[] = [];
  afterAll(async () => {
    await coord?.stop();
    for (const d of dirs) await rm(d, { recursive: true, force: true });
  });
  const vmenv = (args: string[]) =>
    run(process.execPath, [cliMain, "--coordinator", coord?.socket ?? "", ...args], {
      env: noVmenvEnv,
      timeoutMs: 30_000,
    });

  it("an operation left RUNNING by a previous coordinator whose kind is gone ends FAILED, visibly", async () => {
    coord = await startCoordinator([], {}, { keepDir: true });
    dirs.push(coord.dir);
    const empty = await vmenv(["-o", "json", "op", "list"]);
    expect(empty.stderr).toBe("");
    expect(JSON.parse(empty.stdout)).toEqual({ operations: [] });
    const missing = await vmenv(["op", "get", "nosuchop"]);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("NOT_FOUND");
    expect(missing.stderr).toContain("OPERATION_NOT_FOUND");
    await coord.stop();

    // What a coordinator of another version might have left: a running operation holding a lock.
    const id = "0000000001-0000abcd";
    const store = await openLevelStore(coord.dataDir);
    await store.transact(async (tx) => {
      tx.put(`op/${id}`, {
        id,
        kind: "test.gone",
        target: "environments/shop",
        state: "running",
        input: {},
        data: {},
        steps: [
          { id: "one", description: "step one", state: "succeeded", attempts: 1, requestId: `${id}.one` },
          { id: "two", description: "step two", state: "running", attempts: 1, requestId: `${id}.two` },
        ],
        percent: 40,
        stage: "two",
        children: [],
        lock: "shop",
        createMs: 1000,
        startMs: 1000,
        updateMs: 1000,
        resumeCount: 0,
        cancelRequested: false,
      });
      tx.put("lock/shop", id);
    });
    await store.close();

    coord = await startCoordinator([], {}, { dir: coord.dir, keepDir: true });
    const got = await vmenv(["op", "get", id]);
    expect(got.stderr).toBe("");
    expect(got.stdout).toMatch(/State:\s+failed/);
    expect(got.stdout).toContain("OPERATION_KIND_UNKNOWN");
    expect(got.stdout).toMatch(/one\s+succeeded\s+1/);
    expect(got.stdout).toMatch(/two\s+running\s+1/);
    const failed = await vmenv(["-o", "json", "op", "list", "--state", "failed"]);
    const ops = (JSON.parse(failed.stdout) as { operations: Array<{ id: string; resumeCount: number }> })
      .operations;
    expect(ops.map((o) => [o.id, o.resumeCount])).toEqual([[id, 1]]);
    const wait = await vmenv(["op", "wait", `operations/${id}`, "--timeout", "5"]);
    expect(wait.code).toBe(1);
    const cancel = await vmenv(["op", "cancel", id]);
    expect(cancel.stderr).toContain("FAILED_PRECONDITION");
    await coord.stop();
    const after = await openLevelStore(coord.dataDir);
    expect(await after.get("lock/shop")).toBeUndefined();
    await after.close();
  });
});
