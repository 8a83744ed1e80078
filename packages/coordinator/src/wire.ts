import { mkdir } from "node:fs/promises";
import { toJson } from "@bufbuild/protobuf";
import { MigrationSettingsSchema } from "@vmenv/api/agent/v1";
import { createLogger, type Logger, type RpcServer, serve } from "@vmenv/rpc";
import type { CoordinatorConfig } from "./config.js";
import { Collector } from "./env/collector.js";
import { packEnvironmentResult } from "./env/convert.js";
import { MemberEvents } from "./env/events.js";
import { migrateKind, packMigrationProgress } from "./env/migrate.js";
import { environmentKinds } from "./env/ops.js";
import { Rescheduler, rescheduleKind } from "./env/reschedule.js";
import { environmentService } from "./env/rpc.js";
import { DRAIN_KIND, type DrainInput, drainKind } from "./fleet/drain.js";
import { evacuateKind, startEvacuation } from "./fleet/evacuate.js";
import { Fencer } from "./fleet/fencing.js";
import { Fleet } from "./fleet/fleet.js";
import { Rebalancer } from "./fleet/rebalance.js";
import { agentService } from "./fleet/rpc.js";
import { toPbOperation } from "./ops/convert.js";
import { OperationEngine } from "./ops/engine.js";
import { operationService } from "./ops/rpc.js";
import type { OpRecord } from "./ops/types.js";
import { systemClock } from "./ports.js";
import { openLevelStore } from "./store/level.js";
import type { JsonValue } from "./store/store.js";
import { resourceService } from "./tree/rpc.js";
import { ResourceTree } from "./tree/tree.js";
import { COORDINATOR_VERSION } from "./version.js";

export interface Coordinator {
  logger: Logger;
  server: RpcServer;
  /** Graceful stop: running operations pause (they resume at the next start), calls drain, store closes. */
  stop(): Promise<void>;
}

/** The composition root of vmenv-coordinator: opens the store, builds every service and serves them. */
export async function startCoordinator(config: CoordinatorConfig): Promise<Coordinator> {
  const logger = createLogger("vmenv-coordinator", config.logLevel);
  const clock = systemClock;
  await mkdir(config.dataDir, { recursive: true, mode: 0o750 });
  const store = await openLevelStore(config.dataDir);

  // --- resource tree (tree/) ---
  const tree = new ResourceTree(store, clock);
  const resourceSvc = resourceService(tree);
  // --- fleet and placement (fleet/, placement/); a returning agent is fenced first (fleet/fencing.ts) ---
  const fencer = new Fencer({ store, clock, logger: logger.child({ component: "fencing" }) });
  const fleet = new Fleet({
    fence: async (id, clients) => {
      await fencer.fence(id, clients);
    },
    store,
    clock,
    logger: logger.child({ component: "fleet" }),
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    heartbeatTimeoutMs: config.heartbeatTimeoutMs,
  });
  await fleet.start();
  const agentSvc = agentService(fleet, {
    // DrainAgent starts an "agent.drain" operation (fleet/drain.ts) on the engine built below.
    drain: async (agent, req) => {
      const input: DrainInput = {
        agent,
        reason: req.reason,
        settings: req.settings ? (toJson(MigrationSettingsSchema, req.settings) as JsonValue) : null,
        timeoutMs: req.timeoutMs,
      };
      const op = await engine.start(DRAIN_KIND, `agents/${agent}`, input, {
        ...(req.requestId ? { requestId: req.requestId } : {}),
      });
      return toPbOperation(op, packOp, engine.mayCancel(op));
    },
    // EvacuateAgent starts an "agent.evacuate" operation (fleet/evacuate.ts).
    evacuate: async (agent, requestId, force) =>
      toPbOperation(await startEvacuation({ fleet, engine }, agent, requestId, force), packOp, false),
    // RebalanceFleet runs a pass of the rebalancer (fleet/rebalance.ts) built below.
    rebalancer: { runOnce: (o) => rebalancer.runOnce(o) },
  });
  // --- operations engine (ops/) ---
  // VMENV_COORDINATOR_CRASH_POINT=N (hidden, for crash tests): SIGKILL at the N-th crash point.
  const crashPoint = Number(process.env.VMENV_COORDINATOR_CRASH_POINT ?? 0);
  const engine = new OperationEngine({
    store,
    clock,
    logger: logger.child({ component: "operations" }),
    ...(Number.isInteger(crashPoint) && crashPoint > 0 ? { crashPoint } : {}),
  });
  const packOp = (op: OpRecord) => {
    const result = packEnvironmentResult(op);
    const metadata = packMigrationProgress(op);
    return { ...(result ? { result } : {}), ...(metadata ? { metadata } : {}) };
  };
  const operationSvc = operationService(engine, packOp);
  // --- environments (env/) ---
  const envDeps = {
    store,
    tree,
    fleet,
    clock,
    logger: logger.child({ component: "environments" }),
    reservationTtlMs: config.reservationTtlMs,
  };
  for (const kind of environmentKinds(envDeps)) engine.register(kind);
  engine.register(migrateKind(envDeps));
  engine.register(drainKind({ store, fleet, engine }));
  // --- failure handling: reschedule (env/reschedule.ts), evacuation (fleet/evacuate.ts) ---
  const memberEvents = new MemberEvents(envDeps);
  engine.register(rescheduleKind(envDeps));
  engine.register(evacuateKind({ store, fleet, events: memberEvents }));
  const rescheduler = new Rescheduler({
    ...envDeps,
    engine,
    logger: logger.child({ component: "reschedule" }),
  });
  const environmentSvc = environmentService({
    ...envDeps,
    engine,
    toOperation: (op) => toPbOperation(op, packOp, engine.mayCancel(op)),
  });
  const collector = new Collector({ ...envDeps, logger: logger.child({ component: "collector" }) });
  // --- the rebalancer (fleet/rebalance.ts): one member off the most loaded agent per pass ---
  const rebalancer = new Rebalancer({
    store,
    clock,
    fleet,
    tree,
    engine,
    logger: logger.child({ component: "rebalance" }),
    watermark: config.rebalanceWatermark,
    cooldownMs: config.rebalanceCooldownMs,
  });
  memberEvents.attach(fleet);

  let server: RpcServer;
  try {
    await engine.resumeAll();
    collector.start(config.collectorIntervalMs);
    rebalancer.start(config.rebalanceIntervalMs);
    rescheduler.start(Math.min(1000, config.heartbeatIntervalMs));
    await memberEvents
      .coordinatorStart()
      .catch((err: unknown) => logger.warn({ err }, "coordinatorStart hooks failed"));
    server = await serve({
      services: [resourceSvc, agentSvc, operationSvc, environmentSvc],
      logger,
      unixSocket: { path: config.socket, mode: 0o660 },
      ...(config.listen ? { tcp: config.listen } : {}),
    });
  } catch (err) {
    await rescheduler.stop();
    await rebalancer.stop();
    await collector.stop();
    await engine.stop();
    await fleet.stop();
    await store.close();
    throw err;
  }
  logger.info(
    {
      version: COORDINATOR_VERSION,
      unixSocket: server.unixSocket,
      tcpAddress: server.tcpAddress,
      dataDir: config.dataDir,
    },
    "vmenv-coordinator ready",
  );
  return {
    logger,
    server,
    stop: async () => {
      await rescheduler.stop();
      await rebalancer.stop();
      await collector.stop();
      await engine.stop();
      await server.close(config.shutdownGraceMs);
      await fleet.stop();
      await store.close();
    },
  };
}
