import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { type HostInfo, HostInfoSchema } from "@vmenv/api/agent/v1";
import { createLogger } from "@vmenv/rpc";
import { VmenvError } from "@vmenv/rpc/errors";
import { describe, expect, it } from "vitest";
import { ZERO_USAGE } from "../domain/usage.js";
import type { AgentClients } from "../ports.js";
import { keys } from "../store/keys.js";
import { memoryStore } from "../store/memory.js";
import { capacityFromHost, Fleet, HEARTBEAT_PERSIST_MS } from "./fleet.js";

const GIB = 1024n ** 3n;

/** A fake agent: answers or not, as the test says. Its networks are uplinked when in `uplinked`. */
class FakeAgent {
  up = true;
  calls = 0;
  networks = ["networks/lan"];
  uplinked = new Set<string>();
  info: HostInfo = create(HostInfoSchema, {
    hostname: "h1",
    cpu: { threads: 4 },
    memory: { totalBytes: 8n * GIB },
    capacity: {
      vcpusAllocatable: 12,
      memoryAllocatableBytes: 6n * GIB,
      gpusTotal: 1,
      gpuMemoryTotalBytes: 16n * GIB,
    },
  });
  clients(address: string): AgentClients {
    const fail = () => new ConnectError(`cannot reach ${address}: connection refused`, Code.Unavailable);
    return {
      host: {
        getHostInfo: async () => {
          this.calls++;
          if (!this.up) throw fail();
          return this.info;
        },
      },
      networks: {
        listNetworks: async () => {
          if (!this.up) throw fail();
          const networks = this.networks.map((name, i) => ({
            name,
            cidr: `10.${i}.0.0/24`,
            gateway: `10.${i}.0.1`,
            uplink: this.uplinked.has(name) ? "eth1" : "",
          }));
          return { networks, nextPageToken: "" };
        },
      },
    } as unknown as AgentClients;
  }
}

function setup(opts: { store?: ReturnType<typeof memoryStore> } = {}) {
  const store = opts.store ?? memoryStore();
  const clock = {
    t: 1_700_000_000_000,
    now() {
      return this.t;
    },
  };
  const agents = new Map<string, FakeAgent>();
  const fake = (address: string) => {
    let a = agents.get(address);
    if (!a) {
      a = new FakeAgent();
      agents.set(address, a);
    }
    return a;
  };
  const fleet = new Fleet({
    store,
    clock,
    logger: createLogger("test", "silent"),
    heartbeatIntervalMs: 200,
    heartbeatTimeoutMs: 1500,
    connect: (address) => fake(address).clients(address),
    manualHeartbeat: true,
  });
  const events: string[] = [];
  fleet.on("down", (v) => events.push(`down ${v.id}`));
  fleet.on("up", (v) => events.push(`up ${v.id}`));
  return { store, clock, fleet, fake, events };
}

async function code(p: Promise<unknown> | (() => Promise<unknown>)): Promise<VmenvError> {
  try {
    await (typeof p === "function" ? p() : p);
  } catch (err) {
    if (err instanceof VmenvError) return err;
    throw err;
  }
  throw new Error("expected a VmenvError");
}

describe("Fleet: registration", () => {
  it("registers a reachable agent READY with its capacity and networks; repeating changes nothing", async () => {
    const { fleet } = setup();
    await fleet.start();
    const v = await fleet.register("a1", "10.0.0.1:7443", { zone: "a" });
    expect(v).toMatchObject({
      id: "a1",
      state: "ready",
      labels: { zone: "a" },
      capacity: { vcpus: 12, memoryBytes: 6n * GIB, gpus: 1, gpuMemoryBytes: 16n * GIB },
      networks: ["networks/lan"],
    });
    const again = await fleet.register("a1", "10.0.0.1:7443", {});
    expect(again.etag).toBe(v.etag);
    expect(again.labels).toEqual({ zone: "a" });
    const other = await code(fleet.register("a1", "10.0.0.2:7443", {}));
    expect([other.code, other.reason]).toEqual(["already-exists", "AGENT_ALREADY_EXISTS"]);
    const dup = await code(fleet.register("a2", "10.0.0.1:7443", {}));
    expect(dup.message).toContain("one agent per address");
  });

  it("refuses an unreachable agent with UNAVAILABLE naming the address, and keeps nothing", async () => {
    const { fleet, fake, store } = setup();
    await fleet.start();
    fake("10.0.0.9:7443").up = false;
    const err = await code(fleet.register("a9", "10.0.0.9:7443", {}));
    expect(err.code).toBe("unavailable");
    expect(err.reason).toBe("AGENT_UNREACHABLE");
    expect(err.metadata).toEqual({ agent: "agents/a9", address: "10.0.0.9:7443" });
    expect(fleet.views()).toEqual([]);
    expect(await store.get(keys.agent("a9"))).toBeUndefined();
  });

  it("refuses bad ids and addresses", async () => {
    const { fleet } = setup();
    await fleet.start();
    expect((await code(fleet.register("A_1", "h:1", {}))).reason).toBe("INVALID_AGENT_ID");
    expect((await code(fleet.register("a1", "nohost", {}))).reason).toBe("INVALID_AGENT_ADDRESS");
    expect((await code(fleet.register("a1", "h:70000", {}))).reason).toBe("INVALID_AGENT_ADDRESS");
  });

  it("replays a request id, and refuses it for another request", async () => {
    const { fleet } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {}, "r1");
    await fleet.remove("a1", { requestId: "r2" });
    await fleet.remove("a1", { requestId: "r2" }); // replay: no NOT_FOUND
    expect((await code(fleet.cordon("a1", "x", "r1"))).reason).toBe("REQUEST_ID_REUSED");
  });

  it("survives a restart on the same store", async () => {
    const { fleet, store } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", { zone: "a" });
    await fleet.cordon("a1", "disk swap");
    await store.transact((tx) => fleet.charge(tx, "a1", { ...ZERO_USAGE, vms: 1, vcpus: 2 }));
    await fleet.stop();
    const again = setup({ store });
    await again.fleet.start();
    expect(again.fleet.get("a1")).toMatchObject({
      state: "cordoned",
      stateMessage: "cordoned: disk swap",
      labels: { zone: "a" },
      allocated: { vms: 1, vcpus: 2 },
      capacity: { vcpus: 12 },
    });
  });

  it("loads an agent record without network details (written before ADR 20) and learns them at the next beat", async () => {
    const { fleet, store, fake } = setup();
    await store.transact(async (tx) => {
      tx.put(keys.agent("a1"), {
        address: "10.0.0.1:7443",
        labels: {},
        cordoned: false,
        cordonReason: "",
        down: false,
        downMessage: "",
        networks: ["networks/lan"],
        createMs: 1,
        updateMs: 1,
        gen: 1,
      });
    });
    await fleet.start();
    expect(fleet.get("a1")).toMatchObject({ state: "ready", networks: ["networks/lan"], networkDetails: [] });
    fake("10.0.0.1:7443").uplinked.add("networks/lan");
    await fleet.heartbeatOnce();
    const lan = { name: "networks/lan", cidr: "10.0.0.0/24", gateway: "10.0.0.1", uplink: "eth1" };
    expect(fleet.get("a1").networkDetails).toEqual([lan]);
    expect(await store.get(keys.agent("a1"))).toMatchObject({ networkDetails: [lan] });
  });
});

describe("Fleet: state", () => {
  it("cordon and uncordon; update with etag; remove refuses while something is placed unless forced", async () => {
    const { fleet, store } = setup();
    await fleet.start();
    const v0 = await fleet.register("a1", "10.0.0.1:7443", {});
    const c = await fleet.cordon("a1", "disk swap");
    expect([c.state, c.stateMessage]).toEqual(["cordoned", "cordoned: disk swap"]);
    expect((await fleet.cordon("a1", "other")).stateMessage).toBe("cordoned: disk swap");
    expect((await fleet.uncordon("a1")).state).toBe("ready");
    const stale = await code(fleet.update("a1", { labels: { zone: "b" } }, v0.etag));
    expect([stale.code, stale.reason]).toEqual(["aborted", "ETAG_MISMATCH"]);
    const u = await fleet.update("a1", { labels: { zone: "b" } }, fleet.get("a1").etag);
    expect(u.labels).toEqual({ zone: "b" });
    const moved = await fleet.update("a1", { address: "10.0.0.5:7443" });
    expect(moved.address).toBe("10.0.0.5:7443");

    await store.transact((tx) => fleet.charge(tx, "a1", { ...ZERO_USAGE, vms: 1, vcpus: 2 }));
    const busy = await code(fleet.remove("a1"));
    expect([busy.code, busy.reason, busy.metadata.agent]).toEqual([
      "failed-precondition",
      "AGENT_IN_USE",
      "agents/a1",
    ]);
    await fleet.remove("a1", { force: true });
    expect(fleet.view("a1")).toBeUndefined();
    expect(await store.get(keys.alloc("a1"))).toBeUndefined();
    expect((await code(fleet.remove("a1"))).reason).toBe("AGENT_NOT_FOUND");
    await fleet.remove("a1", { allowMissing: true });
  });

  it("charge and release in the caller's transaction: all or nothing, never below zero", async () => {
    const { fleet, store } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {});
    const need = { ...ZERO_USAGE, vms: 1, vcpus: 2, memoryBytes: GIB };
    await store.transact((tx) => fleet.charge(tx, "a1", need));
    await store.transact((tx) => fleet.charge(tx, "a1", need));
    expect(fleet.get("a1").allocated).toMatchObject({ vms: 2, vcpus: 4, memoryBytes: 2n * GIB });
    await expect(
      store.transact(async (tx) => {
        await fleet.charge(tx, "a1", need);
        throw new Error("the caller's step failed");
      }),
    ).rejects.toThrow("the caller's step failed");
    expect(fleet.get("a1").allocated.vcpus).toBe(4);
    await store.transact((tx) => fleet.release(tx, "a1", { ...need, vcpus: 10 }));
    expect(fleet.get("a1").allocated).toMatchObject({ vms: 1, vcpus: 0, memoryBytes: GIB });
    expect((await code(store.transact((tx) => fleet.charge(tx, "zz", need)))).reason).toBe("AGENT_NOT_FOUND");
    await store.transact((tx) => fleet.release(tx, "zz", need)); // gone agent: nothing to do
  });

  it("clients: NOT_FOUND for an unknown agent, UNAVAILABLE for a DOWN one", async () => {
    const { fleet, fake, clock } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {});
    expect(fleet.clients("a1")).toBeDefined();
    expect((await code(async () => fleet.clients("zz"))).reason).toBe("AGENT_NOT_FOUND");
    fake("10.0.0.1:7443").up = false;
    clock.t += 2000;
    await fleet.heartbeatOnce();
    const err = await code(async () => fleet.clients("a1"));
    expect([err.code, err.reason, err.metadata.agent]).toEqual([
      "unavailable",
      "AGENT_UNAVAILABLE",
      "agents/a1",
    ]);
  });
});

describe("Fleet: heartbeats", () => {
  it("DOWN after the timeout (not before), with the last error; up again when it answers", async () => {
    const { fleet, fake, clock, events, store } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {});
    await fleet.cordon("a1", "maintenance");
    const agent = fake("10.0.0.1:7443");
    const okAt = clock.t;
    agent.up = false;
    for (let i = 0; i < 7; i++) {
      clock.t += 200; // 1400 ms without an answer: not yet
      await fleet.heartbeatOnce();
    }
    expect(fleet.get("a1").state).toBe("cordoned");
    expect(events).toEqual([]);
    clock.t += 200;
    await fleet.heartbeatOnce();
    const down = fleet.get("a1");
    expect(down.state).toBe("down");
    expect(down.stateMessage).toBe(
      `no heartbeat since ${new Date(okAt).toISOString()}: cannot reach 10.0.0.1:7443: connection refused`,
    );
    expect(events).toEqual(["down a1"]);
    expect((await store.get<{ down: boolean }>(keys.agent("a1")))?.down).toBe(true);
    clock.t += 200;
    await fleet.heartbeatOnce();
    expect(events).toEqual(["down a1"]); // once
    const unc = await code(fleet.uncordon("a1"));
    expect(unc.reason).toBe("AGENT_DOWN");

    agent.up = true;
    agent.networks = ["networks/db", "networks/lan"];
    clock.t += 200;
    await fleet.heartbeatOnce();
    const up = fleet.get("a1");
    expect([up.state, up.lastHeartbeatMs, up.networks]).toEqual([
      "cordoned",
      clock.t,
      ["networks/db", "networks/lan"],
    ]);
    expect(events).toEqual(["down a1", "up a1"]);
  });

  it("keeps heartbeats in memory, persisting them at most every few seconds", async () => {
    const { fleet, clock, store } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {});
    const registered = clock.t;
    const stored = async () =>
      (await store.get<{ lastHeartbeatMs: number }>(keys.agent("a1")))?.lastHeartbeatMs;
    for (let i = 0; i < 5; i++) {
      clock.t += 200;
      await fleet.heartbeatOnce();
    }
    expect(fleet.get("a1").lastHeartbeatMs).toBe(clock.t);
    expect(await stored()).toBe(registered);
    clock.t += HEARTBEAT_PERSIST_MS;
    await fleet.heartbeatOnce();
    expect(await stored()).toBe(clock.t);
  });

  it("gives every agent a full timeout after a coordinator restart", async () => {
    const { fleet, store, clock } = setup();
    await fleet.start();
    await fleet.register("a1", "10.0.0.1:7443", {});
    await fleet.stop();
    const again = setup({ store });
    again.clock.t = clock.t + 60_000; // the coordinator was away a minute
    await again.fleet.start();
    again.fake("10.0.0.1:7443").up = false;
    await again.fleet.heartbeatOnce();
    expect(again.fleet.get("a1").state).toBe("ready");
    again.clock.t += 1500;
    await again.fleet.heartbeatOnce();
    expect(again.fleet.get("a1").state).toBe("down");
    expect(again.fleet.get("a1").stateMessage).toMatch(/^no heartbeat since .*: cannot reach/);
  });
});

describe("capacityFromHost", () => {
  it("uses the agent's allocatable figures, or threads × 4 and memory less 1 GiB without them", () => {
    expect(capacityFromHost(new FakeAgent().info)).toEqual({
      vcpus: 12,
      memoryBytes: 6n * GIB,
      gpus: 1,
      gpuMemoryBytes: 16n * GIB,
    });
    const old = create(HostInfoSchema, { cpu: { threads: 4 }, memory: { totalBytes: 8n * GIB } });
    expect(capacityFromHost(old)).toEqual({ vcpus: 16, memoryBytes: 7n * GIB, gpus: 0, gpuMemoryBytes: 0n });
  });
});
