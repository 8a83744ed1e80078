import { describe, expect, it, vi } from "vitest";
import { checkEvacuable, startEvacuation } from "./evacuate.js";
import { fleetWorld, member } from "./testing/world.js";

describe("EvacuateAgent with force, over a real fleet and fake agents", () => {
  it("empties a live agent: DOWN at once and held there; when it answers afterwards its stale copy is destroyed before it is READY", async () => {
    const w = await fleetWorld(["a1", "a2"]);
    await w.createOn("a1", "shop", [member("web-1", 200, { recreate: true }), member("pet-1", 200)]);
    expect(() => checkEvacuable(w.fleet, "a1")).toThrow(/agents\/a1 is READY, not DOWN/);

    // While the member is recreated on a2, a1 answers a heartbeat: it stays DOWN, so the move commits.
    const a2 = w.agent("a2");
    const clients = a2.clients.bind(a2);
    const duringMove: string[] = [];
    a2.clients = () => {
      const c = clients();
      const createVm = c.vms.createVm.bind(c.vms);
      (c.vms as { createVm: unknown }).createVm = async (req: never) => {
        await w.beat();
        duringMove.push(w.fleet.get("a1").state);
        return createVm(req);
      };
      return c;
    };
    const op = await startEvacuation({ fleet: w.fleet, engine: w.engine }, "a1", "", true);
    const done = await w.engine.wait(op.id, 10_000);
    expect(done.state, JSON.stringify(done.error)).toBe("succeeded");
    expect(done.steps.map((s) => s.id)).toEqual(["down", "select", "env.shop", "report"]);
    expect(done.data.never).toEqual(["environments/shop/pet-1"]);
    expect(duringMove).toEqual(["down"]);

    const shop = await w.env("shop");
    expect(shop.members.map((m) => [m.id, m.agent, m.state])).toEqual([
      ["web-1", "a2", "RUNNING"],
      ["pet-1", "a1", "LOST"],
    ]);
    expect(shop.members[1]?.stateMessage).toBe(
      `agents/a1 is down: evacuated by operations/${op.id} (EvacuateAgent with force: the operator vouches that it is dead or will be fenced)`,
    );
    // The live agent's copy of web-1 was stopped before its new copy started: never two running.
    const child = await w.engine.get(done.children[0] as string);
    expect(child?.data["old.web-1"]).toBe("stopped");
    expect(w.agent("a1").running().sort()).toEqual(["vms/shop-pet-1"]);
    expect(w.fleet.get("a1").state).toBe("down");

    const atUp: string[][] = [];
    w.fleet.on("up", () => atUp.push(w.agent("a1").running().sort()));
    await w.beat();
    expect(w.fleet.get("a1").state).toBe("ready");
    expect(atUp).toEqual([["vms/shop-pet-1"]]);
    expect(w.agent("a2").running()).toEqual(["vms/shop-web-1"]);
    await vi.waitFor(async () => expect(await w.where("shop")).toContainEqual(["pet-1", "a1", "RUNNING"]));
  });

  it("a forced evacuation that cannot move anything ends its hold: the agent is fenced back, its members adopted", async () => {
    const w = await fleetWorld(["a1", "a2"]);
    await w.createOn("a1", "shop", [member("web-1", 200, { recreate: true })]);
    await w.fleet.cordon("a2", "full");
    const op = await startEvacuation({ fleet: w.fleet, engine: w.engine }, "a1", "", true);
    const done = await w.engine.wait(op.id, 10_000);
    expect(done.state).toBe("failed");
    expect(done.error?.reason).toBe("EVACUATION_INCOMPLETE");
    expect(await w.where("shop")).toEqual([["web-1", "a1", "LOST"]]);

    await w.beat();
    expect(w.fleet.get("a1").state).toBe("ready");
    expect(w.agent("a1").running()).toEqual(["vms/shop-web-1"]);
    await vi.waitFor(async () => expect(await w.where("shop")).toEqual([["web-1", "a1", "RUNNING"]]));
  });

  it("refuses force on a DRAINING agent", async () => {
    const w = await fleetWorld(["a1", "a2"]);
    await w.fleet.setDraining("a1", "drain-1");
    expect(() => checkEvacuable(w.fleet, "a1", true)).toThrow(/being drained by operations\/drain-1/);
  });
});
