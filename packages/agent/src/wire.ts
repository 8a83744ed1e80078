import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { BlockService, DiagnosticsService, GpuService, NetworkService, VmService } from "@vmenv/api/agent/v1";
import {
  createLogger,
  type Logger,
  type RpcServer,
  serve,
  type TlsServerConfig,
  unimplementedService,
} from "@vmenv/rpc";
import type { AgentConfig } from "./config.js";
import { HostInventorySource, probeAccelerators } from "./host/index.js";
import { hostService } from "./host/rpc.js";
import { AGENT_VERSION } from "./version.js";

export interface Agent {
  logger: Logger;
  server: RpcServer;
  /** Graceful stop: drain calls for the configured grace period, close listeners. */
  stop(): Promise<void>;
}

/** The composition root of vmenv-agent: builds every adapter and service and serves them. */
export async function startAgent(config: AgentConfig, now: () => number = Date.now): Promise<Agent> {
  const logger = createLogger("vmenv-agent", config.logLevel);
  const startTimeMs = now();
  await mkdir(config.stateDir, { recursive: true, mode: 0o750 });

  const inventory = new HostInventorySource({ qemuBinary: config.qemuBinary });
  // The accelerator probes start once the agent listens (a second agent refused its socket starts no
  // QEMU) and run in the background; GetHostInfo waits for them (a few seconds at most). Stopping the
  // agent aborts them, and their scratch files live under the state directory.
  const stopProbes = new AbortController();
  let startProbes: () => void = () => undefined;
  const probes = new Promise<void>((resolve) => (startProbes = resolve))
    .then(() => inventory.staticPart())
    .then((s) =>
      probeAccelerators({
        qemuPath: s.qemuPath,
        timeoutMs: config.kvmProbeTimeoutMs,
        signal: stopProbes.signal,
        tmpDir: join(config.stateDir, "tmp"),
      }),
    );
  const probesDone = probes.then(
    (accelerators) => logger.info({ accelerators }, "accelerator probes done"),
    (err: unknown) => {
      if (!stopProbes.signal.aborted) logger.error({ err }, "accelerator probes failed");
    },
  );
  await mkdir(join(config.stateDir, "tmp"), { recursive: true, mode: 0o700 });

  const issue = (n: number, what: string) => `${what} arrives with issue #${n}`;
  const services = [
    hostService({
      inventory: () => inventory.read(),
      accelerators: () => probes,
      setting: config.accelerator,
      version: AGENT_VERSION,
      startTimeMs,
      now,
    }),
    unimplementedService(VmService, issue(3, "the VM lifecycle on QEMU")),
    unimplementedService(BlockService, issue(4, "block storage")),
    unimplementedService(NetworkService, issue(4, "networking")),
    unimplementedService(GpuService, issue(5, "GPU passthrough")),
    unimplementedService(DiagnosticsService, issue(5, "diagnostics")),
  ];

  let tls: TlsServerConfig | undefined;
  if (config.tlsCert && config.tlsKey) {
    tls = {
      cert: await readFile(config.tlsCert),
      key: await readFile(config.tlsKey),
      ...(config.tlsClientCa ? { clientCa: await readFile(config.tlsClientCa) } : {}),
      requireClientCert: config.tlsRequireClientCert,
    };
  }
  const server = await serve({
    services,
    logger,
    unixSocket: { path: config.socket, mode: config.socketMode },
    ...(config.listen ? { tcp: { ...config.listen, ...(tls ? { tls } : {}) } } : {}),
  });
  startProbes();
  logger.info(
    {
      version: AGENT_VERSION,
      unixSocket: server.unixSocket,
      tcpAddress: server.tcpAddress,
      tls: tls !== undefined,
    },
    "vmenv-agent ready",
  );
  return {
    logger,
    server,
    stop: async () => {
      stopProbes.abort();
      await Promise.all([server.close(config.shutdownGraceMs), probesDone]);
    },
  };
}
