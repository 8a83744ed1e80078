import { create } from "@bufbuild/protobuf";
import { VmSchema } from "@vmenv/api/agent/v1";
import { MemberSchema } from "@vmenv/api/coordinator/v1";
import pino from "pino";
import { describe, expect, it } from "vitest";
import {
  addUsage,
  type StoredUsage,
  subUsage,
  type Usage,
  usageFromStore,
  usageToStore,
} from "../domain/usage.js";
import type { AgentView } from "../fleet/fleet.js";
import { OperationEngine } from "../ops/engine.js";
import type { OpRecord } from "../ops/types.js";
import { keys } from "../store/keys.js";
import { memoryStore } from "../store/memory.js";
import type { Txn } from "../store/store.js";
import { Collector } from "./collector.js";
import { memberFromPb } from "./convert.js";
import { MemberEvents } from "./events.js";
import type { EnvRecord, MemberRecord } from "./model.js";
import { type CreateInput, type EnvDeps, environmentKinds } from "./ops.js";
import { FakeAgent } from "./testing/fake-agent.js";
import { acmeTree } from "./testing/tree.js";

const MIB = 1024n * 1024n;

const capacity = { vcpus: 8, memoryBytes: 4096n * MIB, gpus: 0, gpuMemoryBytes: 0n };

async function setup(policy: { maxVms?: number } = {}) {
  const store = memoryStore();
  const clock = { now: () => Date.now() };
  const logger = pino({ level: "silent" });
  const tree = await acmeTree(store, clock, policy);
  const agents = new Map([
    ["a1", new FakeAgent("a1")],
    ["a2", new FakeAgent("a2")],
  ]);
  const allocs = new Map<string, Usage>();
  const fleet: EnvDeps["fleet"] = {
    views: () =>
      [...agents.keys()].map(
        (id) =>
          ({
            id,
            state: "ready",
            labels: {},
            capacity,
            allocated: allocs.get(id) ?? usageFromStore(undefined),
            networks: [],
          }) as unknown as AgentView,
      ),
    clients: (id) => (agents.get(id) as FakeAgent).clients(),
    async charge(tx: Txn, id: string, d: Usage) {
      const next = addUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
    async release(tx: Txn, id: string, d: Usage) {
      const next = subUsage(usageFromStore(await tx.get<StoredUsage>(keys.alloc(id))), d);
      tx.put(keys.alloc(id), usageToStore(next));
      tx.afterCommit(() => allocs.set(id, next));
    },
  };
  const deps: EnvDeps = { store, tree, fleet, clock, logger, reservationTtlMs: 60_000 };
  const engine = new OperationEngine({ store, clock, logger, retry: { attempts: 0 } });
  for (const k of environmentKinds(deps)) engine.register(k);
  const run = async (kind: string, input: OpRecord["input"]) => {
    const op = await engine.start(kind, "environments/shop", input);
    return engine.wait(op.id, 10_000);
  };
  const env = () => store.get<EnvRecord>(keys.env("shop"));
  const vmsEverywhere = () => [...agents.values()].flatMap((a) => [...a.vms.keys()]).sort();
  const usage = async () => usageFromStore(await store.get<StoredUsage>(keys.usage("acme")));
  return { store, engine, agents, run, env, vmsEverywhere, usage, deps };
}

function member(id: string, role: string, volume = false): MemberRecord {
  return memberFromPb(
    create(MemberSchema, {
      id,
      role,
      kind: "",
      priority: 0,
      spec: {
        vcpus: 1,
        memoryBytes: 128n * MIB,
        disks: volume ? [{ id: "d", volume: "volumes/data" }] : [],
        boot: { method: { case: "directKernel", value: { kernelPath: "/k" } } },
      },
      volumes: volume ? [{ id: "data", sizeBytes: 64n * MIB }] : [],
      placement: {
        affinityRules:
          role === "web" ? [{ type: 2, enforcement: 1, roles: ["web"], memberIds: [], weight: 0 }] : [],
      },
    }),
  );
}

const createInput = (members: MemberRecord[], start = false): CreateInput => ({
  env: "shop",
  node: "acme",
  description: "",
  labels: {},
  members,
  start,
  fingerprint: "fp",
});

describe("environment operations over fake agents", () => {
  it("creates, starts, suspends, resumes, stops and deletes, leaving nothing", async () => {
    const t = await setup();
    const op = await t.run(
      "environment.create",
      createInput([member("web-1", "web"), member("web-2", "web"), member("db-1", "db", true)], true),
    );
    expect(op.state, JSON.stringify(op.error)).toBe("succeeded");
    const e = (await t.env()) as EnvRecord;
    expect(e.members.map((m) => [m.id, m.state])).toEqual([
      ["web-1", "RUNNING"],
      ["web-2", "RUNNING"],
      ["db-1", "RUNNING"],
      ["web-lb", "RUNNING"],
    ]);
    expect(e.members[0]?.agent).not.toBe(e.members[1]?.agent);
    expect(t.vmsEverywhere()).toEqual([
      "vms/shop-db-1",
      "vms/shop-web-1",
      "vms/shop-web-2",
      "vms/shop-web-lb",
    ]);
    const lbAgent = t.agents.get(e.members[3]?.agent ?? "") as FakeAgent;
    expect(lbAgent.vms.get("vms/shop-web-lb")?.labels["vmenv.dev/upstreams"]).toBe("web-1,web-2");
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    expect((await t.usage()).vms).toBe(4);
    expect((await t.usage()).blockBytes).toBe(64n * MIB);
    expect(op.steps.map((s) => s.id)).toEqual([
      "claim",
      "vm.web-1",
      "vm.web-2",
      "volumes.db-1",
      "vm.db-1",
      "vm.web-lb",
      "outputs",
      "start.web-1",
      "start.web-2",
      "start.db-1",
      "start.web-lb",
    ]);

    for (const [kind, state] of [
      ["environment.suspend", "PAUSED"],
      ["environment.resume", "RUNNING"],
      ["environment.stop", "STOPPED"],
    ] as const) {
      const r = await t.run(kind, { env: "shop", members: [] });
      expect(r.state, JSON.stringify(r.error)).toBe("succeeded");
      expect(((await t.env()) as EnvRecord).members.every((m) => m.state === state)).toBe(true);
    }
    const del = await t.run("environment.delete", { env: "shop", force: false });
    expect(del.state, JSON.stringify(del.error)).toBe("succeeded");
    expect(await t.env()).toBeUndefined();
    expect(t.vmsEverywhere()).toEqual([]);
    expect([...t.agents.values()].flatMap((a) => [...a.volumes.keys()])).toEqual([]);
    expect((await t.usage()).vms).toBe(0);
  });

  it("rolls a failed create back completely: no VM, no volume, no usage, no record", async () => {
    const t = await setup();
    (t.agents.get("a2") as FakeAgent).failCreateVm = true;
    (t.agents.get("a1") as FakeAgent).failCreateVm = false;
    const op = await t.run(
      "environment.create",
      createInput([member("web-1", "web", true), member("web-2", "web", true)]),
    );
    expect(op.state).toBe("failed");
    expect(op.error?.message).toContain("no room for the VMM");
    expect(await t.env()).toBeUndefined();
    expect(t.vmsEverywhere()).toEqual([]);
    expect([...t.agents.values()].flatMap((a) => [...a.volumes.keys()])).toEqual([]);
    expect((await t.usage()).vms).toBe(0);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    expect(await t.store.list("alloc/")).toEqual(
      [...(await t.store.list("alloc/"))].filter(([, u]) => (u as StoredUsage).vms === 0),
    );
  });

  it("refuses a create over quota in its claim, leaving nothing", async () => {
    const t = await setup({ maxVms: 1 });
    const op = await t.run("environment.create", createInput([member("a-1", "a"), member("b-1", "b")]));
    expect(op.state).toBe("failed");
    expect(op.error?.reason).toBe("QUOTA_EXCEEDED");
    expect(await t.env()).toBeUndefined();
    expect(t.vmsEverywhere()).toEqual([]);
  });

  it("adds and removes members, the balancer following the role", async () => {
    const t = await setup();
    expect((await t.run("environment.create", createInput([member("web-1", "")]))).state).toBe("succeeded");
    const add = (m: MemberRecord) => t.run("environment.add_member", { env: "shop", member: m });
    expect((await add({ ...member("web-2", ""), role: "web" })).state).toBe("succeeded");
    let e = (await t.env()) as EnvRecord;
    // web-1 had no role: web-2 is alone in "web", no balancer yet.
    expect(e.members.map((m) => m.id)).toEqual(["web-1", "web-2"]);
    expect((await add({ ...member("web-3", ""), role: "web" })).state).toBe("succeeded");
    e = (await t.env()) as EnvRecord;
    expect(e.members.map((m) => m.id)).toEqual(["web-1", "web-2", "web-3", "web-lb"]);
    expect((await t.usage()).vms).toBe(4);
    const rm = await t.run("environment.remove_member", { env: "shop", member: "web-3", force: true });
    expect(rm.state, JSON.stringify(rm.error)).toBe("succeeded");
    e = (await t.env()) as EnvRecord;
    expect(e.members.map((m) => m.id)).toEqual(["web-1", "web-2"]);
    expect(t.vmsEverywhere()).toEqual(["vms/shop-web-1", "vms/shop-web-2"]);
    expect((await t.usage()).vms).toBe(2);
  });

  it("collects an expired claim of a finished operation and a VM no member owns", async () => {
    const t = await setup();
    expect((await t.run("environment.create", createInput([member("a-1", "a")]))).state).toBe("succeeded");
    // A claim left behind by an operation that no longer exists, with its usage counted.
    const u = { vms: 1, vcpus: 1, memoryBytes: 128n * MIB, blockBytes: 0n, gpus: 0, gpuMemoryBytes: 0n };
    await t.store.transact(async (tx) => {
      await t.deps.tree.charge(tx, "acme", u);
      await t.deps.fleet.charge(tx, "a1", u);
      tx.put(keys.claim("gone.x"), {
        op: "gone",
        env: "nope",
        member: "x",
        agent: "a1",
        node: "acme",
        usage: usageToStore(u),
        deadlineMs: 0,
      });
    });
    expect((await t.usage()).vms).toBe(2);
    const a1 = t.agents.get("a1") as FakeAgent;
    a1.vms.set(
      "vms/ghost-x",
      create(VmSchema, {
        name: "vms/ghost-x",
        labels: {
          "vmenv.dev/environment": "ghost",
          "vmenv.dev/member": "x",
          "vmenv.dev/managed-by": "vmenv-coordinator",
        },
      }),
    );
    a1.vms.set("vms/other", create(VmSchema, { name: "vms/other", labels: {} }));
    const collector = new Collector(t.deps);
    await collector.runOnce();
    expect((await t.usage()).vms).toBe(1);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    expect(t.vmsEverywhere()).toEqual(["vms/other", "vms/shop-a-1"]);
    expect(collector.counters).toMatchObject({ claimsReleased: 1, vmsRemoved: 1 });
  });

  it("collects a migration's expired claim: the destination's room goes back, the member stays", async () => {
    const t = await setup();
    expect((await t.run("environment.create", createInput([member("a-1", "a")]))).state).toBe("succeeded");
    const before = await t.env();
    const src = before?.members[0]?.agent as string;
    const dst = src === "a1" ? "a2" : "a1";
    const alloc = async (id: string) => usageFromStore(await t.store.get<StoredUsage>(keys.alloc(id))).vms;
    // A migration that died with its claim on the destination charged (only the agent, not the tree).
    const u = { vms: 1, vcpus: 1, memoryBytes: 128n * MIB, blockBytes: 0n, gpus: 0, gpuMemoryBytes: 0n };
    await t.store.transact(async (tx) => {
      await t.deps.fleet.charge(tx, dst, u);
      tx.put(keys.claim("gone.a-1"), {
        op: "gone",
        env: "shop",
        member: "a-1",
        agent: dst,
        node: "acme",
        usage: usageToStore(u),
        deadlineMs: 0,
        migrationFrom: src,
      });
    });
    expect([await alloc(src), await alloc(dst)]).toEqual([1, 1]);
    const collector = new Collector(t.deps);
    await collector.collectClaims();
    expect([await alloc(src), await alloc(dst)]).toEqual([1, 0]);
    expect((await t.usage()).vms).toBe(1);
    expect(await t.store.list(keys.claimPrefix)).toEqual([]);
    expect((await t.env())?.members.map((m) => [m.id, m.agent])).toEqual([["a-1", src]]);
    expect(collector.counters.claimsReleased).toBe(1);
  });

  it("marks members of a DOWN agent LOST and back, the balancer's upstreams following", async () => {
    const t = await setup();
    const op = await t.run(
      "environment.create",
      createInput([member("web-1", "web"), member("web-2", "web")]),
    );
    expect(op.state).toBe("succeeded");
    const events = new MemberEvents(t.deps);
    const down = ((await t.env()) as EnvRecord).members.find((m) => m.id === "web-1")?.agent as string;
    await events.agentDown(down, "no heartbeat");
    let e = (await t.env()) as EnvRecord;
    expect(e.members.find((m) => m.id === "web-1")).toMatchObject({ state: "LOST" });
    expect(e.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-2");
    await events.agentUp(down);
    e = (await t.env()) as EnvRecord;
    expect(e.members.find((m) => m.id === "web-1")).toMatchObject({ state: "STOPPED", stateMessage: "" });
    expect(e.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2");
    const lb = e.members.find((m) => m.id === "web-lb") as MemberRecord;
    const vm = (t.agents.get(lb.agent) as FakeAgent).vms.get("vms/shop-web-lb");
    expect(vm?.labels["vmenv.dev/upstreams"]).toBe("web-1,web-2");

    // Drifted outputs are repaired when the coordinator starts.
    await t.store.transact(async (tx) => {
      const x = (await tx.get<EnvRecord>(keys.env("shop"))) as EnvRecord;
      (x.members.find((m) => m.id === "web-lb") as MemberRecord).outputs.upstreams = "stale";
      tx.put(keys.env("shop"), x);
    });
    await events.coordinatorStart();
    e = (await t.env()) as EnvRecord;
    expect(e.members.find((m) => m.id === "web-lb")?.outputs.upstreams).toBe("web-1,web-2");
  });
});
