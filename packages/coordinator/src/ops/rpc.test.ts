import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import {
  OperationService,
  OperationState,
  StepState,
  WatchEventType,
  type WatchOperationsResponse,
} from "@vmenv/api/coordinator/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createLogger, errorMapperInterceptor } from "@vmenv/rpc";
import { describe, expect, it } from "vitest";
import { memoryStore } from "../store/memory.js";
import { OperationEngine } from "./engine.js";
import { operationService } from "./rpc.js";
import { type BuildInput, buildKind, captureLogger, MemoryWorld } from "./testing/kinds.js";
import type { OpRecord } from "./types.js";
import { OpChangeLog, watchOps } from "./watch.js";

const silent = createLogger("t", "silent");

function setup(gates: Map<string, Promise<void>> = new Map()) {
  const { logger } = captureLogger();
  const engine = new OperationEngine({
    store: memoryStore(),
    clock: { now: () => Date.now() },
    logger,
    retry: { attempts: 0 },
  });
  engine.register(buildKind(new MemoryWorld(), { onRun: (step) => gates.get(step) }));
  const b = operationService(engine, () => ({}));
  const transport = createRouterTransport(({ service }) => service(b.service, b.impl as never), {
    router: { interceptors: [errorMapperInterceptor(silent)] },
  });
  const build = (inp: BuildInput, target = "environments/shop") =>
    engine.start("test.build", target, inp as never);
  return { engine, client: createClient(OperationService, transport), build };
}

function gate() {
  let open!: () => void;
  const p = new Promise<void>((r) => (open = r));
  return { p, open };
}

describe("OperationService (in memory)", () => {
  it("Get shows steps, the error as google.rpc.Status with ErrorInfo, and names", async () => {
    const { engine, client, build } = setup();
    const op = await build({ items: ["a", "b"], failAt: "b", env: "shop" });
    await engine.idle();
    const got = await client.getOperation({ name: `operations/${op.id}` });
    expect(got).toMatchObject({
      name: `operations/${op.id}`,
      kind: "test.build",
      target: "environments/shop",
      state: OperationState.FAILED,
      environmentLock: "environments/shop",
      mayCancel: false,
    });
    expect(got.steps.map((s) => [s.id, s.state, s.requestId])).toEqual([
      ["make:a", StepState.ROLLED_BACK, `${op.id}.make:a`],
      ["make:b", StepState.ROLLED_BACK, `${op.id}.make:b`],
    ]);
    expect(got.error?.code).toBe(Code.FailedPrecondition);
    expect(got.error?.message).toBe("cannot make b");
    const info = anyUnpack(got.error?.details[0] as never, ErrorInfoSchema);
    expect(info).toMatchObject({ reason: "NO_ROOM", domain: "vmenv.dev", metadata: { item: "b" } });
    expect(got.steps[1]?.error?.code).toBe(Code.FailedPrecondition);
    const bad = await client.getOperation({ name: "nope/x" }).catch((e: unknown) => e);
    expect(ConnectError.from(bad).code).toBe(Code.InvalidArgument);
    const missing = await client.getOperation({ name: "operations/zzz" }).catch((e: unknown) => e);
    expect(ConnectError.from(missing).code).toBe(Code.NotFound);
    expect(ConnectError.from(missing).findDetails(ErrorInfoSchema)[0]?.reason).toBe("OPERATION_NOT_FOUND");
  });

  it("List filters and pages newest first; a filter expression is refused", async () => {
    const { engine, client, build } = setup();
    const a = await build({ items: ["a"] }, "environments/a");
    const b = await build({ items: ["b"], failAt: "b" }, "environments/b");
    const c = await build({ items: ["c"] }, "environments/a");
    await engine.idle();
    const all = await client.listOperations({});
    expect(all.operations.map((o) => o.id)).toEqual([c.id, b.id, a.id]);
    const onA = await client.listOperations({ target: "environments/a", pageSize: 1 });
    expect(onA.operations.map((o) => o.id)).toEqual([c.id]);
    const next = await client.listOperations({
      target: "environments/a",
      pageSize: 1,
      pageToken: onA.nextPageToken,
    });
    expect(next.operations.map((o) => o.id)).toEqual([a.id]);
    expect(next.nextPageToken).toBe("");
    const failed = await client.listOperations({ states: [OperationState.FAILED] });
    expect(failed.operations.map((o) => o.id)).toEqual([b.id]);
    const err = await client.listOperations({ filter: 'kind = "x"' }).catch((e: unknown) => e);
    expect(ConnectError.from(err).code).toBe(Code.InvalidArgument);
  });

  it("Wait returns when done or at its timeout; Cancel rolls back", async () => {
    const g = gate();
    const { engine, client, build } = setup(new Map([["make:b", g.p]]));
    const op = await build({ items: ["a", "b"], blockAt: "b" });
    const early = await client.waitOperation({ name: `operations/${op.id}`, timeout: durationFromMs(50) });
    expect(early.state).toBe(OperationState.RUNNING);
    expect(early.mayCancel).toBe(true);
    g.open();
    const cancelled = await client.cancelOperation({ name: `operations/${op.id}` });
    expect(cancelled.mayCancel).toBe(false);
    const done = await client.waitOperation({ name: `operations/${op.id}` });
    expect(done.state).toBe(OperationState.CANCELLED);
    expect(done.endTime).toBeDefined();
    const again = await client.cancelOperation({ name: op.id }).catch((e: unknown) => e);
    expect(ConnectError.from(again).code).toBe(Code.FailedPrecondition);
    await engine.stop();
  });

  it("Watch: snapshot of unfinished ones, SYNCED, changes; a resume token continues after an event", async () => {
    const g = gate();
    const { engine, client, build } = setup(new Map([["make:x", g.p]]));
    const done = await build({ items: ["d"] }, "environments/done");
    await engine.wait(done.id, 1000);
    const running = await build({ items: ["x"] }, "environments/run");
    await new Promise((r) => setTimeout(r, 10));
    const ac = new AbortController();
    const seen: WatchOperationsResponse[] = [];
    let notify: () => void = () => undefined;
    const reading = (async () => {
      try {
        for await (const e of client.watchOperations({}, { signal: ac.signal })) {
          seen.push(e);
          notify();
        }
      } catch {
        // aborted
      }
    })();
    const until = async (f: () => boolean) => {
      while (!f()) await new Promise<void>((r) => (notify = r));
    };
    await until(() => seen.some((e) => e.type === WatchEventType.SYNCED));
    expect(seen.map((e) => [e.type, e.operation?.target])).toEqual([
      [WatchEventType.INITIAL, "environments/run"],
      [WatchEventType.SYNCED, undefined],
    ]);
    const fresh = await build({ items: ["n"] }, "environments/new");
    await until(() =>
      seen.some((e) => e.operation?.id === fresh.id && e.operation.state === OperationState.SUCCEEDED),
    );
    const created = seen.find((e) => e.operation?.id === fresh.id);
    expect(created?.type).toBe(WatchEventType.CREATED);
    const mark = seen.findIndex((e) => e.type === WatchEventType.CREATED);
    const token = seen[mark]?.resumeToken as string;
    g.open();
    await until(() =>
      seen.some((e) => e.operation?.id === running.id && e.operation.state === OperationState.SUCCEEDED),
    );
    ac.abort();
    await reading;
    // Resume from the CREATED event: SYNCED, then exactly the events after it.
    const resumed: WatchOperationsResponse[] = [];
    const ac2 = new AbortController();
    const want = seen.length - mark - 1;
    for await (const e of client.watchOperations({ resumeToken: token }, { signal: ac2.signal })) {
      resumed.push(e);
      if (resumed.length === want + 1) break;
    }
    expect(resumed[0]?.type).toBe(WatchEventType.SYNCED);
    expect(resumed.slice(1).map((e) => e.resumeToken)).toEqual(
      seen.slice(mark + 1).map((e) => e.resumeToken),
    );
    const stale = await (async () => {
      for await (const _ of client.watchOperations({ resumeToken: "00000000.1" })) break;
    })().catch((e: unknown) => e);
    expect(ConnectError.from(stale).code).toBe(Code.OutOfRange);
    expect(running.id).toBeTruthy();
    await engine.stop();
  });

  it("Watch with a root: the operation and its descendants only", async () => {
    const { engine, client, build } = setup();
    const g = gate();
    const other = await build({ items: ["o"], blockAt: "o" }, "environments/other");
    const parent = await build(
      { items: ["p"], childAt: "p", childItems: ["c1"], blockAt: "c1" },
      "environments/p",
    );
    const names = new Set<string>();
    const ac = new AbortController();
    const reading = (async () => {
      try {
        for await (const e of client.watchOperations(
          { root: `operations/${parent.id}` },
          { signal: ac.signal },
        )) {
          if (e.operation) names.add(e.operation.target === "environments/p" ? e.operation.id : "other");
          if (names.size >= 2) g.open();
        }
      } catch {
        // aborted
      }
    })();
    await g.p;
    ac.abort();
    await reading;
    expect(names.has("other")).toBe(false);
    expect(names.has(parent.id)).toBe(true);
    expect(names.size).toBe(2);
    expect(other.id).toBeTruthy();
    await engine.stop();
  });
});

describe("watchOps", () => {
  it("cuts off a watcher that falls too far behind with RESOURCE_EXHAUSTED", async () => {
    const { engine } = setup();
    const log = new OpChangeLog(engine);
    const ac = new AbortController();
    const it = watchOps(log, {
      resumeToken: "",
      signal: ac.signal,
      snapshot: async () => [],
      match: () => true,
      queueLimit: 5,
    });
    expect((await it.next()).value).toMatchObject({ kind: "synced" });
    const op = { id: "x", state: "running", resumeCount: 0, createMs: 1, updateMs: 2 } as OpRecord;
    for (let i = 0; i < 10; i++) engine.emit("changed", op);
    const err = await (async () => {
      for (;;) await it.next();
    })().catch((e: unknown) => e);
    expect(err).toMatchObject({ code: "resource-exhausted", reason: "WATCH_CLIENT_TOO_SLOW" });
    log.close();
  });
});
