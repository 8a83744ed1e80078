import { mkdir } from "node:fs/promises";
import { createLogger, type Logger, type RpcServer, serve } from "@vmenv/rpc";
import type { CoordinatorConfig } from "./config.js";
import { Collector } from "./env/collector.js";
import { packEnvironmentResult } from "./env/convert.js";
import { MemberEvents } from "./env/events.js";
import { environmentKinds } from "./env/ops.js";
import { environmentService } from "./env/rpc.js";
import { Fleet } from "./fleet/fleet.js";
import { agentService } from "./fleet/rpc.js";
import { toPbOperation } from "./ops/convert.js";
import { OperationEngine } from "./ops/engine.js";
import { operationService } from "./ops/rpc.js";
import { systemClock } from "./ports.js";
import { openLevelStore } from "./store/level.js";
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
  // --- fleet and placement (fleet/, placement/) ---
  const fleet = new Fleet({
    store,
    clock,
    logger: logger.child({ component: "fleet" }),
    heartbeatIntervalMs: config.heartbeatIntervalMs,
    heartbeatTimeoutMs: config.heartbeatTimeoutMs,
  });
  await fleet.start();
  const agentSvc = agentService(fleet);
  // --- operations engine (ops/) ---
  // VMENV_COORDINATOR_CRASH_POINT=N (hidden, for crash tests): SIGKILL at the N-th crash point.
  const crashPoint = Number(process.env.VMENV_COORDINATOR_CRASH_POINT ?? 0);
  const engine = new OperationEngine({
    store,
    clock,
    logger: logger.child({ component: "operations" }),
    ...(Number.isInteger(crashPoint) && crashPoint > 0 ? { crashPoint } : {}),
  });
  const packOp = (op: Parameters<typeof packEnvironmentResult>[0]) => {
    const result = packEnvironmentResult(op);
    return result ? { result } : {};
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
  const environmentSvc = environmentService({
    ...envDeps,
    engine,
    toOperation: (op) => toPbOperation(op, packOp, engine.mayCancel(op)),
  });
  const collector = new Collector({ ...envDeps, logger: logger.child({ component: "collector" }) });
  const memberEvents = new MemberEvents(envDeps);
  memberEvents.attach(fleet);

  let server: RpcServer;
  try {
    await engine.resumeAll();
    collector.start(config.collectorIntervalMs);
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
      await collector.stop();
      await engine.stop();
      await server.close(config.shutdownGraceMs);
      await fleet.stop();
      await store.close();
    },
  };
}
