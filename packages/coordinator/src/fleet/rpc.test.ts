import { Code, ConnectError, createClient, createRouterTransport } from "@connectrpc/connect";
import { AgentService } from "@vmenv/api/coordinator/v1";
import { BadRequestSchema, ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createLogger, errorMapperInterceptor } from "@vmenv/rpc";
import { describe, expect, it } from "vitest";
import { toPbOperation } from "../ops/convert.js";
import { startEvacuation } from "./evacuate.js";
import { Rebalancer } from "./rebalance.js";
import { agentService } from "./rpc.js";
import { fleetWorld, MIB, member } from "./testing/world.js";

/** AgentService over a real fleet, engine and rebalancer, through connect's in-memory transport. */
async function setup() {
  const w = await fleetWorld();
  const rebalancer = new Rebalancer({ ...w, watermark: 0.85, cooldownMs: 300_000 });
  const b = agentService(w.fleet, {
    rebalancer,
    evacuate: async (agent, requestId, force) =>
      toPbOperation(
        await startEvacuation({ fleet: w.fleet, engine: w.engine }, agent, requestId, force),
        () => ({}),
        false,
      ),
  });
  const transport = createRouterTransport(({ service }) => service(b.service, b.impl as never), {
    router: { interceptors: [errorMapperInterceptor(createLogger("t", "silent"))] },
  });
  return { w, client: createClient(AgentService, transport) };
}

async function refused(p: Promise<unknown>): Promise<ConnectError> {
  return ConnectError.from(
    await p.then(
      () => new Error("expected a refusal"),
      (e: unknown) => e,
    ),
  );
}

describe("AgentService.RebalanceFleet (in memory)", () => {
  it("a dry run returns the plan with both agents' loads; a pass starts the migration; a retry replays it", async () => {
    const { w, client } = await setup();
    await w.createOn("a1", "shop", [member("web-1", 200), member("db-1", 700)]);
    const dry = await client.rebalanceFleet({ dryRun: true });
    expect(dry.watermark).toBe(0.85);
    expect(dry.moves).toHaveLength(1);
    expect(dry.moves[0]).toMatchObject({
      environment: "environments/shop",
      memberId: "web-1",
      usage: { vms: 1, vcpus: 1, memoryBytes: 200n * MIB },
      sourceAgent: "agents/a1",
      destinationAgent: "agents/a2",
      sourceLoadBefore: 0.9,
      sourceLoadAfter: 0.7,
      destinationLoadBefore: 0,
      destinationLoadAfter: 0.2,
      operation: "",
    });
    expect(await w.ops("environment.migrate")).toEqual([]);

    const moved = await client.rebalanceFleet({ requestId: "r-1" });
    expect(moved.moves[0]?.operation).toMatch(/^operations\//);
    const again = await client.rebalanceFleet({ requestId: "r-1" });
    expect(again.moves[0]?.operation).toBe(moved.moves[0]?.operation);
    expect(await w.ops("environment.migrate")).toHaveLength(1);
    await w.engine.wait(moved.moves[0]?.operation.replace("operations/", "") ?? "", 10_000);

    const none = await client.rebalanceFleet({ watermark: 1 });
    expect([none.moves.length, none.watermark]).toEqual([0, 1]);
    expect(none.reason).toMatch(/^no READY agent is above the watermark \(100%\)/);
  });

  it("a watermark outside (0, 1] is INVALID_ARGUMENT with ErrorInfo and BadRequest naming the field", async () => {
    const { client } = await setup();
    for (const watermark of [0, 1.5, -1]) {
      const err = await refused(client.rebalanceFleet({ watermark }));
      expect(err.code).toBe(Code.InvalidArgument);
      expect(err.findDetails(ErrorInfoSchema)[0]).toMatchObject({
        reason: "INVALID_WATERMARK",
        metadata: { field: "watermark" },
      });
      expect(err.findDetails(BadRequestSchema)[0]?.fieldViolations[0]?.field).toBe("watermark");
    }
  });
});

describe("AgentService.EvacuateAgent (in memory)", () => {
  it("a live agent: FAILED_PRECONDITION without force, an agent.evacuate operation with it", async () => {
    const { w, client } = await setup();
    const err = await refused(client.evacuateAgent({ name: "agents/a1" }));
    expect(err.code).toBe(Code.FailedPrecondition);
    expect(err.findDetails(ErrorInfoSchema)[0]).toMatchObject({
      reason: "AGENT_NOT_DOWN",
      metadata: { agent: "agents/a1", state: "READY" },
    });
    const op = await client.evacuateAgent({ name: "agents/a1", force: true });
    expect([op.kind, op.target]).toEqual(["agent.evacuate", "agents/a1"]);
    expect((await w.engine.wait(op.id, 10_000)).state).toBe("succeeded");
    expect(w.fleet.get("a1").state).toBe("down");
  });
});
