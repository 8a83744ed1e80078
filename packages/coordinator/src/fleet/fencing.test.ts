import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { HostInfoSchema } from "@vmenv/api/agent/v1";
import { createLogger } from "@vmenv/rpc";
import { describe, expect, it } from "vitest";
import type { AgentClients } from "../ports.js";
import { memoryStore } from "../store/memory.js";
import { Fleet } from "./fleet.js";

/** One fake agent that answers or not; a fence the test controls. */
function setup(store = memoryStore()) {
  const agent = { up: true };
  const clock = { t: 1_700_000_000_000, now: () => clock.t };
  const fences: Array<{ resolve: () => void; reject: (e: Error) => void; seenState: string }> = [];
  const clients = {
    host: {
      getHostInfo: async () => {
        if (!agent.up) throw new ConnectError("connection refused", Code.Unavailable);
        return create(HostInfoSchema, { hostname: "h", cpu: { threads: 4 } });
      },
    },
    networks: { listNetworks: async () => ({ networks: [], nextPageToken: "" }) },
  } as unknown as AgentClients;
  const fleet: Fleet = new Fleet({
    store,
    clock,
    logger: createLogger("test", "silent"),
    heartbeatIntervalMs: 200,
    heartbeatTimeoutMs: 1000,
    connect: () => clients,
    manualHeartbeat: true,
    fence: (id) =>
      new Promise<void>((resolve, reject) => {
        fences.push({ resolve, reject, seenState: `${fleet.get(id).state}: ${fleet.get(id).stateMessage}` });
      }),
  });
  const events: string[] = [];
  fleet.on("down", (v) => events.push(`down ${v.id}`));
  fleet.on("up", (v) => events.push(`up ${v.id}`));
  const goDown = async () => {
    agent.up = false;
    for (let i = 0; i < 6; i++) {
      clock.t += 200;
      await fleet.heartbeatOnce();
    }
    expect(fleet.get("a1").state).toBe("down");
  };
  const replaceable = () => store.transact((tx) => fleet.replaceable(tx, "a1"));
  return { store, agent, clock, fleet, fences, events, goDown, replaceable };
}

const flush = () => new Promise((r) => setTimeout(r, 5));

describe("Fleet: fencing a returning agent", () => {
  it("keeps it DOWN ('fencing') until the fence is done, and refuses moves off it meanwhile", async () => {
    const t = setup();
    await t.fleet.start();
    await t.fleet.register("a1", "10.0.0.1:7443", {});
    await t.goDown();
    expect(await t.replaceable()).toBe(true);
    expect(t.fleet.downSinceMs("a1")).toBeGreaterThan(t.clock.t - 1200);

    t.agent.up = true;
    t.clock.t += 200;
    const beat = t.fleet.heartbeatOnce();
    await flush();
    expect(t.fences).toHaveLength(1);
    expect(t.fences[0]?.seenState).toMatch(/^down: fencing: agents\/a1 answers again/);
    expect(t.fleet.get("a1").state).toBe("down");
    expect(await t.replaceable()).toBe(false);
    expect(() => t.fleet.clients("a1")).toThrow(/is down/);
    t.fences[0]?.resolve();
    await beat;
    expect(t.fleet.get("a1").state).toBe("ready");
    expect(t.events).toEqual(["down a1", "up a1"]);
    expect(await t.replaceable()).toBe(false);
  });

  it("a failed fence leaves it DOWN (moves allowed again) and is retried at the next heartbeat", async () => {
    const t = setup();
    await t.fleet.start();
    await t.fleet.register("a1", "10.0.0.1:7443", {});
    await t.goDown();
    t.agent.up = true;
    t.clock.t += 200;
    let beat = t.fleet.heartbeatOnce();
    await flush();
    t.fences[0]?.reject(new Error("listVms: deadline exceeded"));
    await beat;
    expect(t.fleet.get("a1").state).toBe("down");
    expect(t.fleet.get("a1").stateMessage).toContain("fencing failed: listVms: deadline exceeded");
    expect(await t.replaceable()).toBe(true);
    expect(t.events).toEqual(["down a1"]);

    t.clock.t += 200;
    beat = t.fleet.heartbeatOnce();
    await flush();
    expect(t.fences).toHaveLength(2);
    t.fences[1]?.resolve();
    await beat;
    expect(t.fleet.get("a1").state).toBe("ready");
  });

  it("a coordinator that stops mid-fence clears the mark at start and fences again", async () => {
    const store = memoryStore();
    const t = setup(store);
    await t.fleet.start();
    await t.fleet.register("a1", "10.0.0.1:7443", {});
    await t.goDown();
    t.agent.up = true;
    t.clock.t += 200;
    void t.fleet.heartbeatOnce();
    await flush();
    expect(await t.replaceable()).toBe(false); // fencing mark persisted

    // "Crash": a new fleet on the same store, the old fence never finished.
    const again = setup(store);
    again.agent.up = false;
    await again.fleet.start();
    expect(again.fleet.get("a1").state).toBe("down");
    expect(await again.replaceable()).toBe(true);
    again.agent.up = true;
    again.clock.t += 200;
    const beat = again.fleet.heartbeatOnce();
    await flush();
    expect(again.fences).toHaveLength(1);
    again.fences[0]?.resolve();
    await beat;
    expect(again.fleet.get("a1").state).toBe("ready");
  });
});

describe("Fleet: an agent held DOWN by a forced evacuation", () => {
  it("goes DOWN at once like a missed deadline, answers but is neither fenced nor READY until the hold ends", async () => {
    const t = setup();
    await t.fleet.start();
    await t.fleet.register("a1", "10.0.0.1:7443", {});
    await t.fleet.holdDown("a1", "op-1", "evacuated by operations/op-1");
    expect(t.fleet.get("a1")).toMatchObject({ state: "down", stateMessage: "evacuated by operations/op-1" });
    expect(t.events).toEqual(["down a1"]);
    expect(await t.replaceable()).toBe(true);
    await t.fleet.holdDown("a1", "op-1", "again"); // the same operation resumed: no change, no event
    expect(t.events).toEqual(["down a1"]);

    for (let i = 0; i < 3; i++) {
      t.clock.t += 200;
      await t.fleet.heartbeatOnce();
    }
    await flush();
    expect(t.fences).toHaveLength(0);
    expect(t.fleet.get("a1").state).toBe("down");
    expect(t.fleet.get("a1").lastHeartbeatMs).toBe(t.clock.t);
    expect(await t.replaceable()).toBe(true);

    // A restart keeps the hold; another operation's release does nothing.
    const again = setup(t.store);
    await again.fleet.start();
    await again.store.transact((tx) => again.fleet.releaseHold(tx, "a1", "op-2"));
    again.clock.t += 200;
    await again.fleet.heartbeatOnce();
    expect([again.fleet.get("a1").state, again.fences.length]).toEqual(["down", 0]);

    await again.store.transact((tx) => again.fleet.releaseHold(tx, "a1", "op-1"));
    again.clock.t += 200;
    const beat = again.fleet.heartbeatOnce();
    await flush();
    expect(again.fences).toHaveLength(1);
    expect(again.fences[0]?.seenState).toMatch(/^down: fencing: agents\/a1 answers again/);
    again.fences[0]?.resolve();
    await beat;
    expect(again.fleet.get("a1").state).toBe("ready");
    expect(again.events).toEqual(["up a1"]);
  });

  it("is refused while the agent is being fenced or drained", async () => {
    const t = setup();
    await t.fleet.start();
    await t.fleet.register("a1", "10.0.0.1:7443", {});
    await t.fleet.setDraining("a1", "drain-1");
    await expect(t.fleet.holdDown("a1", "op-1", "x")).rejects.toMatchObject({ reason: "AGENT_DRAINING" });
    await t.fleet.setDraining("a1", undefined);
    await t.goDown();
    t.agent.up = true;
    t.clock.t += 200;
    const beat = t.fleet.heartbeatOnce();
    await flush();
    await expect(t.fleet.holdDown("a1", "op-1", "x")).rejects.toMatchObject({ reason: "AGENT_FENCING" });
    t.fences[0]?.resolve();
    await beat;
  });
});
