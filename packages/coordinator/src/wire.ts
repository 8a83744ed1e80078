import { mkdir } from "node:fs/promises";
import {
  AgentService,
  EnvironmentService,
  OperationService,
  ResourceService,
} from "@vmenv/api/coordinator/v1";
import { createLogger, type Logger, type RpcServer, serve, unimplementedService } from "@vmenv/rpc";
import type { CoordinatorConfig } from "./config.js";
import { systemClock } from "./ports.js";
import { openLevelStore } from "./store/level.js";
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
  void clock;

  // --- resource tree (tree/) ---
  const resourceSvc = unimplementedService(ResourceService, "the resource tree is being built");
  // --- fleet and placement (fleet/, placement/) ---
  const agentSvc = unimplementedService(AgentService, "the fleet is being built");
  // --- operations engine (ops/) ---
  const operationSvc = unimplementedService(OperationService, "operations are being built");
  // --- environments (env/) ---
  const environmentSvc = unimplementedService(EnvironmentService, "environments are being built");

  let server: RpcServer;
  try {
    server = await serve({
      services: [resourceSvc, agentSvc, operationSvc, environmentSvc],
      logger,
      unixSocket: { path: config.socket, mode: 0o660 },
      ...(config.listen ? { tcp: config.listen } : {}),
    });
  } catch (err) {
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
      await server.close(config.shutdownGraceMs);
      await store.close();
    },
  };
}
