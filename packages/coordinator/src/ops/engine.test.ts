import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Code, ConnectError } from "@connectrpc/connect";
import { VmenvError } from "@vmenv/rpc/errors";
import { afterEach, describe, expect, it } from "vitest";
import { openLevelStore } from "../store/level.js";
import { memoryStore } from "../store/memory.js";
import type { Store } from "../store/store.js";
import { OperationEngine } from "./engine.js";
import { type BuildInput, buildKind, captureLogger, type Hooks, MemoryWorld } from "./testing/kinds.js";
import type { OperationKind, OpRecord } from "./types.js";

const dirs: string[] = [];
const stores: Store[] = [];
afterEach(async () => {
  for (const s of stores.splice(0)) await s.close().catch(() => undefined);
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

const clock = { now: () => Date.now() };
const fastRetry = { attempts: 3, baseDelayMs: 5, maxDelayMs: 20, totalMs: 5000 };

const backends: Array<[string, () => Promise<Store>]> = [
  ["memory", async () => memoryStore()],
  [
    "leveldb",
    async () => {
      const dir = await mkdtemp(join(tmpdir(), "vmenv-ops-"));
      dirs.push(dir);
      const s = await openLevelStore(join(dir, "db"));
      stores.push(s);
      return s;
    },
  ],
];

function engineOn(
  store: Store,
  world: MemoryWorld,
  opts: { crashPoint?: number; hooks?: Hooks; kind?: Partial<OperationKind> } = {},
) {
  const { logger, lines } = captureLogger();
  const engine: OperationEngine = new OperationEngine({
    store,
    clock,
    logger,
    retry: fastRetry,
    ...(opts.crashPoint ? { crashPoint: opts.crashPoint, crash: () => engine.freeze() } : {}),
  });
  engine.register(buildKind(world, opts.hooks, opts.kind));
  return { engine, lines };
}

const build = (engine: OperationEngine, inp: BuildInput, o: Parameters<OperationEngine["start"]>[3] = {}) =>
  engine.start("test.build", "environments/shop", inp as never, o);

describe.each(backends)("operation engine on %s", (_name, open) => {
  it("runs steps in order, committing each completion with its onComplete writes", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const seen: Array<{ step: string; rec: unknown; prev: string | undefined }> = [];
    const { engine } = engineOn(store, world, {
      hooks: {
        async onRun(step, ctx) {
          // What an earlier step completed is in the store (its mark and its writes) before this one runs.
          const stored = (await store.get(`op/${ctx.op.id}`)) as unknown as OpRecord;
          const prev = stored.steps[stored.steps.findIndex((s) => s.id === step) - 1];
          seen.push({ step, rec: prev && (await store.get(`rec/${prev.id.slice(5)}`)), prev: prev?.state });
        },
      },
    });
    const op = await build(engine, { items: ["a", "b", "c"] });
    expect(op.state).toBe("pending");
    expect(await store.get(`op/${op.id}`)).toBeDefined();
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("succeeded");
    expect(done.result).toEqual({ items: ["a", "b", "c"] });
    expect(done.steps.map((s) => [s.id, s.state, s.attempts, s.requestId])).toEqual([
      ["make:a", "succeeded", 1, `${op.id}.make:a`],
      ["make:b", "succeeded", 1, `${op.id}.make:b`],
      ["make:c", "succeeded", 1, `${op.id}.make:c`],
    ]);
    expect(done.data).toEqual({ "saw:a": true, "saw:b": true, "saw:c": true });
    expect(seen).toEqual([
      { step: "make:a", rec: undefined, prev: undefined },
      { step: "make:b", rec: { op: op.id }, prev: "succeeded" },
      { step: "make:c", rec: { op: op.id }, prev: "succeeded" },
    ]);
    expect(world.log).toEqual(["+a", "+b", "+c"]);
    expect(await engine.get(op.id)).toEqual(done);
    await engine.stop();
  });

  it("rolls a failed step back in reverse and ends FAILED with the step's error", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const op = await build(engine, { items: ["a", "b", "c", "d"], failAt: "c", env: "shop" });
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("failed");
    expect(done.error).toEqual({
      code: "failed-precondition",
      message: "cannot make c",
      reason: "NO_ROOM",
      metadata: { item: "c" },
    });
    expect(done.steps.map((s) => [s.id, s.state])).toEqual([
      ["make:a", "rolled_back"],
      ["make:b", "rolled_back"],
      ["make:c", "rolled_back"],
      ["make:d", "pending"],
    ]);
    expect(done.steps[2]?.error?.reason).toBe("NO_ROOM");
    // The failed step acted before failing: it is undone too, then the others in reverse order.
    expect(world.log).toEqual(["+a", "+b", "+c", "-c", "-b", "-a"]);
    expect(await store.get(`failed/${op.id}`)).toBe("NO_ROOM");
    expect(await store.get("lock/shop")).toBeUndefined();
    await engine.stop();
  });

  it("fails a step whose onComplete throws, writing nothing of that step", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const op = await build(engine, { items: ["a", "b"], failOnCompleteAt: "b" });
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("failed");
    expect(done.error?.reason).toBe("QUOTA_EXCEEDED");
    expect(await store.get("rec/b")).toBeUndefined();
    expect(await store.get("rec/a")).toEqual({ op: op.id });
    expect(world.items.size).toBe(0);
    await engine.stop();
  });

  it("retries transient errors and fails once they persist", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const ok = await build(engine, { items: ["a", "b"], flakyAt: "b", flaky: 2 });
    const done = await engine.wait(ok.id, 5000);
    expect(done.state).toBe("succeeded");
    expect(done.steps[1]?.attempts).toBe(3);
    const bad = await build(engine, { items: ["x", "y"], flakyAt: "y", flaky: 10 });
    const failed = await engine.wait(bad.id, 5000);
    expect(failed.state).toBe("failed");
    expect(failed.error).toMatchObject({ code: "unavailable", reason: "AGENT_UNREACHABLE" });
    expect(failed.steps[1]?.attempts).toBe(4);
    expect(world.items).toEqual(new Set(["a", "b"]));
    await engine.stop();
  });

  it("retries connect UNAVAILABLE errors from agents too", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let calls = 0;
    const { engine } = engineOn(store, world, {
      hooks: {
        onRun() {
          if (++calls < 3) throw new ConnectError("connection refused", Code.Unavailable);
        },
      },
    });
    const op = await build(engine, { items: ["a"] });
    expect((await engine.wait(op.id, 5000)).state).toBe("succeeded");
    expect(calls).toBe(3);
    await engine.stop();
  });

  it("cancels a running operation: its step is aborted, completed steps undone, CANCELLED", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let blocked!: () => void;
    const reached = new Promise<void>((r) => (blocked = r));
    const { engine } = engineOn(store, world, {
      hooks: {
        onRun(step) {
          if (step === "make:c") blocked();
        },
      },
    });
    const op = await build(engine, { items: ["a", "b", "c", "d"], blockAt: "c", env: "shop" });
    await reached;
    const c = await engine.cancel(op.id);
    expect(c.cancelRequested).toBe(true);
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("cancelled");
    expect(done.error).toMatchObject({ code: "cancelled", reason: "OPERATION_CANCELLED" });
    expect(world.items.size).toBe(0);
    expect(world.log).toEqual(["+a", "+b", "-b", "-a"]);
    expect(done.steps.map((s) => s.state)).toEqual(["rolled_back", "rolled_back", "rolled_back", "pending"]);
    await expect(engine.cancel(op.id)).rejects.toMatchObject({
      code: "failed-precondition",
      reason: "OPERATION_FINISHED",
    });
    expect(await store.get("lock/shop")).toBeUndefined();
    await engine.stop();
  });

  it("refuses to cancel a kind that is not cancellable", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let go!: () => void;
    const gate = new Promise<void>((r) => (go = r));
    const { engine } = engineOn(store, world, {
      hooks: { onRun: () => gate },
      kind: { cancellable: false },
    });
    const op = await build(engine, { items: ["a"] });
    await expect(engine.cancel(op.id)).rejects.toMatchObject({ reason: "OPERATION_NOT_CANCELLABLE" });
    go();
    expect((await engine.wait(op.id, 5000)).state).toBe("succeeded");
    await engine.stop();
  });

  it("serialises operations on one environment; wait:false fails ABORTED naming the holder", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let go!: () => void;
    const gate = new Promise<void>((r) => (go = r));
    const order: string[] = [];
    const { engine } = engineOn(store, world, {
      hooks: {
        async onRun(step) {
          order.push(step);
          if (step === "make:a1") await gate;
        },
      },
    });
    const first = await build(engine, { items: ["a1", "a2"], env: "shop" });
    const second = await build(engine, { items: ["b1"], env: "shop" });
    const other = await build(engine, { items: ["o1"], env: "other" });
    expect(second.blockedBy).toBe(first.id);
    const err = await build(engine, { items: ["c1"], env: "shop" }, { wait: false }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(VmenvError);
    expect(err).toMatchObject({
      code: "aborted",
      reason: "ENVIRONMENT_LOCKED",
      metadata: { environment: "environments/shop", operation: `operations/${first.id}` },
    });
    expect((await engine.wait(other.id, 5000)).state).toBe("succeeded");
    expect((await engine.get(second.id)).state).toBe("pending");
    expect(await store.get("lock/shop")).toBe(first.id);
    go();
    expect((await engine.wait(second.id, 5000)).state).toBe("succeeded");
    expect(order.filter((s) => s !== "make:o1")).toEqual(["make:a1", "make:a2", "make:b1"]);
    expect((await engine.get(first.id)).state).toBe("succeeded");
    expect((await engine.get(second.id)).blockedBy).toBeUndefined();
    expect(await store.get("lock/shop")).toBeUndefined();
    await engine.stop();
  });

  it("cancels a PENDING operation at once", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let go!: () => void;
    const gate = new Promise<void>((r) => (go = r));
    const { engine } = engineOn(store, world, {
      hooks: { onRun: (s) => (s === "make:a" ? gate : undefined) },
    });
    const first = await build(engine, { items: ["a"], env: "shop" });
    const second = await build(engine, { items: ["b"], env: "shop" });
    const third = await build(engine, { items: ["c"], env: "shop" });
    await engine.cancel(second.id);
    expect((await engine.wait(second.id, 5000)).state).toBe("cancelled");
    go();
    expect((await engine.wait(third.id, 5000)).state).toBe("succeeded");
    expect((await engine.get(first.id)).state).toBe("succeeded");
    expect(world.items).toEqual(new Set(["a", "c"]));
    await engine.stop();
  });

  it("replays a request id: the first operation, not a second", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const a = await build(engine, { items: ["a"] }, { requestId: "req-1" });
    const b = await build(engine, { items: ["zzz"] }, { requestId: "req-1" });
    expect(b.id).toBe(a.id);
    await engine.idle();
    const c = await build(engine, { items: ["a"] }, { requestId: "req-1" });
    expect(c).toMatchObject({ id: a.id, state: "succeeded" });
    const listed = await engine.list({ requestId: "req-1", pageSize: 0, pageToken: "" });
    expect(listed.ops.map((o) => o.id)).toEqual([a.id]);
    expect(world.log).toEqual(["+a"]);
    await engine.stop();
  });

  it("runs a child operation under its parent's lock and waits for it", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const op = await build(engine, {
      items: ["a", "b"],
      env: "shop",
      childAt: "b",
      childItems: ["b1", "b2"],
    });
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("succeeded");
    expect(done.children).toHaveLength(1);
    const childId = done.children[0] as string;
    expect(done.steps[1]?.childOperation).toBe(`operations/${childId}`);
    const child = await engine.get(childId);
    expect(child).toMatchObject({ state: "succeeded", parent: op.id, lock: "shop" });
    expect(world.log).toEqual(["+a", "+b1", "+b2", "+b"]);
    const kids = await engine.list({ parent: op.id, pageSize: 10, pageToken: "" });
    expect(kids.ops.map((o) => o.id)).toEqual([childId]);
    await engine.stop();
  });

  it("cancelling a parent cancels its running child; both roll back", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let reached!: () => void;
    const at = new Promise<void>((r) => (reached = r));
    const { engine } = engineOn(store, world, {
      hooks: { onRun: (s) => (s === "make:c1" ? reached() : undefined) },
    });
    const op = await build(engine, {
      items: ["a", "b"],
      env: "shop",
      childAt: "b",
      childItems: ["b1", "c1"],
      blockAt: "c1",
    });
    await at;
    await engine.cancel(op.id);
    const done = await engine.wait(op.id, 5000);
    expect(done.state).toBe("cancelled");
    const child = await engine.wait(done.children[0] as string, 5000);
    expect(child.state).toBe("cancelled");
    expect(world.items.size).toBe(0);
    expect(await store.get("lock/shop")).toBeUndefined();
    await engine.stop();
  });

  it("lists newest first, filtered and paginated", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const { engine } = engineOn(store, world);
    const ids: string[] = [];
    for (let i = 0; i < 5; i++)
      ids.push((await build(engine, { items: [`i${i}`], failAt: i % 2 ? `i${i}` : "" })).id);
    await engine.idle();
    const p1 = await engine.list({ pageSize: 2, pageToken: "" });
    expect(p1.ops.map((o) => o.id)).toEqual([ids[4], ids[3]]);
    const p2 = await engine.list({ pageSize: 2, pageToken: p1.next });
    expect(p2.ops.map((o) => o.id)).toEqual([ids[2], ids[1]]);
    const p3 = await engine.list({ pageSize: 2, pageToken: p2.next });
    expect(p3).toEqual({ ops: [expect.objectContaining({ id: ids[0] })], next: "" });
    const failed = await engine.list({ states: ["failed"], pageSize: 0, pageToken: "" });
    expect(failed.ops.map((o) => o.id)).toEqual([ids[3], ids[1]]);
    expect((await engine.list({ kind: "nope", pageSize: 0, pageToken: "" })).ops).toEqual([]);
    await engine.stop();
  });

  it("resumes after a crash at every crash point: each effect applied exactly once", async () => {
    // Count the points an operation passes (crash point 0 = never), then crash at each one.
    const probe = engineOn(await open(), new MemoryWorld());
    const p = await build(probe.engine, { items: ["a", "b", "c"], env: "shop" });
    await probe.engine.wait(p.id, 5000);
    await probe.engine.stop();
    const points = probe.lines.filter((l) => typeof l.crashPoint === "number");
    expect(points.map((l) => l.phase)).toEqual(
      Array(3).fill(["step-started", "step-ran", "step-completed"]).flat(),
    );
    for (let n = 1; n <= points.length; n++) {
      const store = await open();
      const world = new MemoryWorld();
      const first = engineOn(store, world, { crashPoint: n });
      const op = await build(first.engine, { items: ["a", "b", "c"], env: "shop" });
      await first.engine.idle();
      expect((await store.get(`op/${op.id}`)) as unknown as OpRecord).toMatchObject({ state: "running" });
      const second = engineOn(store, world);
      await second.engine.resumeAll();
      const done = await second.engine.wait(op.id, 5000);
      expect(done, `crash point ${n}`).toMatchObject({ state: "succeeded", resumeCount: 1 });
      expect(world.log, `crash point ${n}`).toEqual(["+a", "+b", "+c"]);
      for (const i of ["a", "b", "c"]) expect(await store.get(`rec/${i}`)).toEqual({ op: op.id });
      expect(await store.get("lock/shop")).toBeUndefined();
      await second.engine.stop();
    }
  });

  it("continues a rollback after a crash during it, and honours afterCrash: rollback", async () => {
    const store = await open();
    const world = new MemoryWorld();
    // Points: a (3), b (3), c started+ran (2, then it fails), undo c (3): crash at the first undo of b.
    const first = engineOn(store, world, { crashPoint: 12 });
    const op = await build(first.engine, { items: ["a", "b", "c"], failAt: "c" });
    await first.engine.idle();
    expect(((await store.get(`op/${op.id}`)) as unknown as OpRecord).state).toBe("rolling_back");
    const second = engineOn(store, world);
    await second.engine.resumeAll();
    const done = await second.engine.wait(op.id, 5000);
    expect(done).toMatchObject({ state: "failed", error: { reason: "NO_ROOM" } });
    expect(world.items.size).toBe(0);

    const store2 = await open();
    const world2 = new MemoryWorld();
    const a = engineOn(store2, world2, { crashPoint: 4, kind: { afterCrash: "rollback" } });
    const op2 = await build(a.engine, { items: ["a", "b", "c"] });
    await a.engine.idle();
    const b = engineOn(store2, world2, { kind: { afterCrash: "rollback" } });
    await b.engine.resumeAll();
    const done2 = await b.engine.wait(op2.id, 5000);
    expect(done2).toMatchObject({ state: "failed", error: { reason: "COORDINATOR_RESTARTED" } });
    expect(world2.log).toEqual(["+a", "-a"]);
    await b.engine.stop();
  });

  it("resumes a parent waiting on its child without starting a second child", async () => {
    const store = await open();
    const world = new MemoryWorld();
    // a: 3 points; b starts (1); the child's b1: 3 points; crash as the child's b2 starts (8).
    const first = engineOn(store, world, { crashPoint: 8 });
    const op = await build(first.engine, {
      items: ["a", "b"],
      env: "shop",
      childAt: "b",
      childItems: ["b1", "b2"],
    });
    await first.engine.idle();
    const second = engineOn(store, world);
    await second.engine.resumeAll();
    const done = await second.engine.wait(op.id, 5000);
    expect(done.state).toBe("succeeded");
    expect(done.children).toHaveLength(1);
    expect((await second.engine.get(done.children[0] as string)).resumeCount).toBe(1);
    expect(world.log).toEqual(["+a", "+b1", "+b2", "+b"]);
    await second.engine.stop();
  });

  it("stops gracefully: the running step is aborted, nothing recorded, the next engine resumes", async () => {
    const store = await open();
    const world = new MemoryWorld();
    let reached!: () => void;
    const at = new Promise<void>((r) => (reached = r));
    const first = engineOn(store, world, {
      hooks: { onRun: (s) => (s === "make:b" ? reached() : undefined) },
    });
    const op = await build(first.engine, { items: ["a", "b"], blockAt: "b" });
    await at;
    await first.engine.stop();
    const stored = (await store.get(`op/${op.id}`)) as unknown as OpRecord;
    expect(stored.state).toBe("running");
    expect(stored.steps.map((s) => s.state)).toEqual(["succeeded", "running"]);
    await expect(build(first.engine, { items: ["z"] })).rejects.toMatchObject({ code: "unavailable" });
    // The next coordinator has a step that no longer blocks (input is the same, hooks differ).
    const second = engineOn(store, world, {
      kind: {
        plan: (o) => buildKind(world).plan({ ...o, input: { items: ["a", "b"] } }),
      },
    });
    await second.engine.resumeAll();
    const done = await second.engine.wait(op.id, 5000);
    expect(done).toMatchObject({ state: "succeeded", resumeCount: 1 });
    expect(done.steps[1]?.attempts).toBe(2);
    expect(world.log).toEqual(["+a", "+b"]);
    await second.engine.stop();
  });

  it("fails an operation whose kind is unknown at resume", async () => {
    const store = await open();
    const world = new MemoryWorld();
    const first = engineOn(store, world, { crashPoint: 1 });
    const op = await build(first.engine, { items: ["a"], env: "shop" });
    await first.engine.idle();
    const { logger } = captureLogger();
    const bare = new OperationEngine({ store, clock, logger });
    await bare.resumeAll();
    const done = await bare.get(op.id);
    expect(done).toMatchObject({ state: "failed", error: { reason: "OPERATION_KIND_UNKNOWN" } });
    expect(done.error?.message).toContain('"test.build" is not known');
    expect(await store.get("lock/shop")).toBeUndefined();
    await bare.stop();
  });
});

it("prunes the oldest finished operations beyond the limit", async () => {
  const store = memoryStore();
  const world = new MemoryWorld();
  const { logger } = captureLogger();
  const engine = new OperationEngine({ store, clock, logger, keepFinished: 5 });
  engine.register(buildKind(world));
  const ids: string[] = [];
  for (let i = 0; i < 8; i++) {
    const op = await build(engine, { items: [`i${i}`] }, { requestId: `r${i}` });
    ids.push(op.id);
    await engine.wait(op.id, 5000);
  }
  await engine.idle();
  const left = (await engine.list({ pageSize: 100, pageToken: "" })).ops.map((o) => o.id);
  expect(left.length).toBeLessThanOrEqual(5);
  expect(left[0]).toBe(ids[7]);
  expect(await store.get("opreq/r0")).toBeUndefined();
  await expect(engine.get(ids[0] as string)).rejects.toMatchObject({ reason: "OPERATION_NOT_FOUND" });
  await engine.stop();
});
