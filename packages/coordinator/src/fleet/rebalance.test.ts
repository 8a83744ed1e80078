import { describe, expect, it, vi } from "vitest";
import { ZERO_USAGE } from "../domain/usage.js";
import { MIGRATE_KIND } from "../env/migrate.js";
import type { EnvRecord, MemberRecord, MemberStateName } from "../env/model.js";
import { OperationEngine } from "../ops/engine.js";
import type { PlacementCandidate } from "../placement/place.js";
import { keys } from "../store/keys.js";
import type { JsonValue } from "../store/store.js";
import { agentLoad, type PlanEnv, planRebalance, Rebalancer } from "./rebalance.js";
import { fleetWorld, MIB, member } from "./testing/world.js";

type World = Awaited<ReturnType<typeof fleetWorld>>;

const COOLDOWN = 300_000;

function rebalancer(w: World, engine: World["engine"] = w.engine) {
  return new Rebalancer({
    store: w.store,
    clock: w.clock,
    logger: w.logger,
    fleet: w.fleet,
    tree: w.tree,
    engine,
    watermark: 0.85,
    cooldownMs: COOLDOWN,
  });
}

describe("Rebalancer over a real fleet and fake agents (capacity 8 vCPUs, 1000 MiB each)", () => {
  it("moves exactly one member off the overloaded agent to the least loaded agent that fits, then stops", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("web-2", 200), member("db-1", 500)]);
    await w.createOn("a2", "blog", [member("app", 300)]);
    expect(agentLoad(w.fleet.get("a1").allocated, w.fleet.get("a1").capacity)).toBe(0.9);

    const r = await rebalancer(w).runOnce();
    expect(r.reason).toBe("");
    expect(r.moves).toHaveLength(1);
    const move = r.moves[0];
    // The smallest member that brings a1 to or under 85%, to a3 (0%) rather than a2 (30%).
    expect(move).toMatchObject({
      env: "shop",
      member: "web-1",
      from: "a1",
      to: "a3",
      sourceLoadBefore: 0.9,
      sourceLoadAfter: 0.7,
      destinationLoadBefore: 0,
      destinationLoadAfter: 0.2,
    });
    const op = await w.engine.wait(move?.operation ?? "", 10_000);
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    expect(op.kind).toBe(MIGRATE_KIND);
    expect(op.steps[0]?.description).toContain("rebalance: agents/a1 at 90% > 85%");

    expect(await w.where("shop")).toEqual([
      ["web-1", "a3", "RUNNING"],
      ["web-2", "a1", "RUNNING"],
      ["db-1", "a1", "RUNNING"],
    ]);
    expect(w.agent("a3").running()).toEqual(["vms/shop-web-1"]);
    expect(w.agent("a1").running().sort()).toEqual(["vms/shop-db-1", "vms/shop-web-2"]);
    expect(w.fleet.get("a1").allocated.memoryBytes).toBe(700n * MIB);
    expect(w.fleet.get("a2").allocated.memoryBytes).toBe(300n * MIB);

    const again = await rebalancer(w).runOnce();
    expect(again.moves).toEqual([]);
    expect(again.reason).toBe(
      "no READY agent is above the watermark (85%); the most loaded is agents/a1 at 70%",
    );
  });

  it("moves nothing when no destination would stay at or below the watermark", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("web-2", 200), member("db-1", 500)]);
    await w.createOn("a2", "blog", [member("app", 750)]);
    await w.createOn("a3", "wiki", [member("app", 760)]);

    const r = await rebalancer(w).runOnce();
    expect(r.moves).toEqual([]);
    expect(r.reason).toContain("agents/a1 is at 90% (above 85%) but nothing on it can move");
    expect(r.reason).toContain(
      "shop/web-1: no agent that fits it would stay at or below 85% and below agents/a1's 70% after the move (the least loaded, agents/a2, would be at 95%)",
    );
    expect(r.reason).toContain(
      "shop/db-1: no agent fits member db-1: a2: 250 MiB memory free, 500 MiB needed",
    );
    expect(await w.ops(MIGRATE_KIND)).toEqual([]);
    expect(await w.store.list(keys.rebalancePrefix)).toEqual([]);
  });

  it("moves nothing when the destination would end up fuller than the source (no ping-pong)", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("a", 450), member("b", 450)]);
    await w.createOn("a2", "blog", [member("app", 400)]);
    await w.fleet.cordon("a3", "out of service");

    const r = await rebalancer(w).runOnce();
    expect(r.moves).toEqual([]);
    // a1 90% → 45%, a2 40% → 85%: at the watermark, but fuller than the source it relieved.
    expect(r.reason).toContain(
      "shop/a: no agent that fits it would stay at or below 85% and below agents/a1's 45% after the move (the least loaded, agents/a2, would be at 85%)",
    );
    expect(await w.ops(MIGRATE_KIND)).toEqual([]);
  });

  it("never moves to a cordoned, draining or down agent", async () => {
    const w = await fleetWorld(["a1", "a2", "a3", "a4"]);
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 700)]);
    await w.fleet.cordon("a2", "disk swap");
    await w.fleet.setDraining("a3", "drain-op");
    w.agent("a4").reachable = false;
    for (let i = 0; i < 6; i++) await w.beat();
    expect(w.fleet.views().map((v) => v.state)).toEqual(["ready", "cordoned", "draining", "down"]);

    const r = await rebalancer(w).runOnce();
    expect(r.moves).toEqual([]);
    expect(r.reason).toContain(
      "shop/web-1: no agent fits member web-1: a2: cordoned; a3: draining; a4: down",
    );
    expect(await w.ops(MIGRATE_KIND)).toEqual([]);

    await w.fleet.uncordon("a2");
    const moved = await rebalancer(w).runOnce();
    expect(moved.moves.map((m) => [m.member, m.to])).toEqual([["web-1", "a2"]]);
  });

  it("a dry run shows the move and starts nothing", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 700)]);
    const r = await rebalancer(w).runOnce({ dryRun: true });
    expect(r.dryRun).toBe(true);
    expect(r.moves.map((m) => [m.member, m.from, m.to, m.operation])).toEqual([
      ["web-1", "a1", "a2", undefined],
    ]);
    expect(await w.ops(MIGRATE_KIND)).toEqual([]);
    expect(await w.store.list(keys.rebalancePrefix)).toEqual([]);
    expect(await w.where("shop")).toEqual([
      ["web-1", "a1", "RUNNING"],
      ["db-1", "a1", "RUNNING"],
    ]);
    // No cooldown either: the real pass moves the same member.
    expect((await rebalancer(w).runOnce()).moves.map((m) => m.member)).toEqual(["web-1"]);
  });

  it("does not move an environment again within its cooldown, across a new rebalancer and engine on the same store", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "base", [member("db", 650, { pin: "a1" })]);
    await w.createOn("a1", "shop", [member("web-1", 150), member("web-2", 150)]);
    const first = await rebalancer(w).runOnce();
    expect(first.moves.map((m) => [m.member, m.to])).toEqual([["web-1", "a2"]]);
    const op = await w.engine.wait(first.moves[0]?.operation ?? "", 10_000);
    expect(op.state).toBe("succeeded");
    expect(await w.store.get(keys.rebalance("shop"))).toMatchObject({ member: "web-1", op: op.id });

    // a1 is at 80% now: over a 50% watermark, but base/db is pinned and shop is cooling down.
    const restarted = rebalancer(
      w,
      new OperationEngine({ store: w.store, clock: w.clock, logger: w.logger }),
    );
    const cooling = await restarted.runOnce({ watermark: 0.5 });
    expect(cooling.moves).toEqual([]);
    expect(cooling.reason).toContain("base/db: pinned to agents/a1");
    expect(cooling.reason).toContain(
      `environments/shop: moved by the rebalancer (operations/${op.id}); not again before ${new Date((op.endMs ?? 0) + COOLDOWN).toISOString()}`,
    );
    expect(await w.ops(MIGRATE_KIND)).toHaveLength(1);

    w.clock.t = (op.endMs ?? 0) + COOLDOWN + 1;
    const later = await rebalancer(w).runOnce({ watermark: 0.5 });
    // None brings a1 to 50%: the largest that fits goes, to the least loaded agent.
    expect(later.moves.map((m) => [m.member, m.to])).toEqual([["web-2", "a3"]]);
  });

  it("runs one rebalance migration at a time", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 500)]);
    await w.createOn("a1", "blog", [member("app", 200)]);
    // The destination's prepare waits for the test.
    const a2 = w.agent("a2");
    const clients = a2.clients.bind(a2);
    let open = () => {};
    const gate = new Promise<void>((resolve) => {
      open = resolve;
    });
    a2.clients = () => {
      const c = clients();
      const prepare = c.vms.prepareVmMigration.bind(c.vms);
      (c.vms as { prepareVmMigration: unknown }).prepareVmMigration = async (req: never) => {
        await gate;
        return prepare(req);
      };
      return c;
    };
    const r = rebalancer(w);
    const first = await r.runOnce();
    const move = first.moves[0];
    expect([move?.env, move?.member, move?.to]).toEqual(["blog", "app", "a2"]);
    const second = await r.runOnce();
    expect(second.moves).toEqual([]);
    expect(second.reason).toBe(
      `a rebalance migration is still running (operations/${move?.operation} moves blog/app from agents/a1 to agents/a2); one runs at a time`,
    );
    open();
    expect((await w.engine.wait(move?.operation ?? "", 10_000)).state).toBe("succeeded");
    expect((await r.runOnce({ watermark: 0.5 })).moves.map((m) => `${m.env}/${m.member}`)).toEqual([
      "shop/web-1",
    ]);
  });

  it("replays a request id instead of moving twice, and refuses one used for something else", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 700)]);
    const r = rebalancer(w);
    const first = await r.runOnce({ requestId: "rb-1" });
    await w.engine.wait(first.moves[0]?.operation ?? "", 10_000);
    const again = await r.runOnce({ requestId: "rb-1" });
    expect(again).toEqual(first);
    expect(await w.ops(MIGRATE_KIND)).toHaveLength(1);

    const stop = await w.engine.start(
      "environment.stop",
      "environments/shop",
      { env: "shop", members: [] },
      { requestId: "x" },
    );
    await w.engine.wait(stop.id, 10_000);
    await expect(r.runOnce({ requestId: "x" })).rejects.toMatchObject({
      code: "invalid-argument",
      reason: "REQUEST_ID_REUSED",
    });
  });

  it("refuses a watermark outside (0, 1] with INVALID_ARGUMENT naming the field", async () => {
    const w = await fleetWorld(["a1"]);
    const r = rebalancer(w);
    for (const bad of [0, -0.5, 1.01, Number.NaN])
      await expect(r.runOnce({ watermark: bad })).rejects.toMatchObject({
        code: "invalid-argument",
        reason: "INVALID_WATERMARK",
        metadata: { field: "watermark" },
        fieldViolations: [{ field: "watermark" }],
      });
    expect((await r.runOnce({ watermark: 1 })).reason).toContain("the most loaded is agents/a1 at 0%");
  });

  it("runs a pass every interval once started, none with interval 0", async () => {
    const w = await fleetWorld();
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 700)]);
    const off = rebalancer(w);
    off.start(0);
    await new Promise((r) => setTimeout(r, 50));
    expect(await w.ops(MIGRATE_KIND)).toEqual([]);
    const on = rebalancer(w);
    on.start(20);
    await vi.waitFor(async () => expect(await w.ops(MIGRATE_KIND)).toHaveLength(1), { timeout: 2000 });
    await on.stop();
  });
});

// ---- the choice, without I/O ---------------------------------------------------------------------

const cap = { vcpus: 8, memoryBytes: 1000n * MIB, gpus: 0, gpuMemoryBytes: 0n };
const agentAt = (
  id: string,
  usedMib: number,
  state: PlacementCandidate["state"] = "ready",
): PlacementCandidate => ({
  id,
  state,
  labels: {},
  capacity: cap,
  allocated: { ...ZERO_USAGE, vms: 1, vcpus: 1, memoryBytes: BigInt(usedMib) * MIB },
  networks: [],
});
function placed(
  m: MemberRecord,
  agent: string,
  extra: { state?: MemberStateName; gpus?: number } = {},
): MemberRecord {
  const spec = m.spec as Record<string, JsonValue>;
  return {
    ...m,
    agent,
    state: extra.state ?? "RUNNING",
    spec: extra.gpus
      ? { ...spec, gpus: Array.from({ length: extra.gpus }, (_, i) => ({ id: `g${i}` })) }
      : spec,
  };
}
const planEnv = (id: string, members: MemberRecord[], blocked = ""): PlanEnv => ({
  env: { id, node: "acme", members } as EnvRecord,
  policy: { allowedHostLabels: {} },
  blocked,
});

describe("planRebalance: which member, where", () => {
  it("prefers the member that brings the source under the watermark with the least memory", () => {
    const plan = planRebalance(
      [agentAt("a1", 950), agentAt("a2", 0)],
      [planEnv("shop", [placed(member("big", 300), "a1"), placed(member("small", 100), "a1")])],
      0.85,
    );
    expect([plan.move?.member, plan.move?.sourceLoadAfter]).toEqual(["small", 0.85]);
  });

  it("otherwise moves the largest member that has a destination", () => {
    const plan = planRebalance(
      [agentAt("a1", 1000), agentAt("a2", 0)],
      [planEnv("shop", [placed(member("m-100", 100), "a1"), placed(member("m-120", 120), "a1")])],
      0.85,
    );
    expect([plan.move?.member, plan.move?.to, plan.move?.sourceLoadAfter]).toEqual(["m-120", "a2", 0.88]);
  });

  it("leaves members that are not running, pass a GPU through, are pinned, or whose environment is held or cooling", () => {
    const plan = planRebalance(
      [agentAt("a1", 950), agentAt("a2", 0)],
      [
        planEnv("shop", [
          placed(member("stopped", 100), "a1", { state: "STOPPED" }),
          placed(member("gpu", 100), "a1", { gpus: 1 }),
          placed(member("pinned", 100, { pin: "a1" }), "a1"),
        ]),
        planEnv("blog", [placed(member("app", 100), "a1")], "operations/x holds the environment"),
      ],
      0.85,
    );
    expect(plan.move).toBeUndefined();
    expect(plan.reason).toBe(
      "agents/a1 is at 95% (above 85%) but nothing on it can move: " +
        "shop/stopped: stopped (only running members move live); " +
        "shop/gpu: passes a GPU through (cannot live-migrate); " +
        "shop/pinned: pinned to agents/a1; " +
        "environments/blog: operations/x holds the environment",
    );
  });

  it("takes the next overloaded agent when nothing on the most loaded one can move; ignores cordoned sources", () => {
    const plan = planRebalance(
      [agentAt("a1", 990), agentAt("a2", 900), agentAt("a3", 0), agentAt("a4", 999, "cordoned")],
      [
        planEnv("shop", [placed(member("db", 990, { pin: "a1" }), "a1")]),
        planEnv("blog", [placed(member("app", 100), "a2")]),
        planEnv("wiki", [placed(member("app", 100), "a4")]),
      ],
      0.85,
    );
    expect([plan.move?.env, plan.move?.from, plan.move?.to]).toEqual(["blog", "a2", "a3"]);
  });
});
