import { mkdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { GpuService } from "@vmenv/api/agent/v1";
import {
  createLogger,
  type Logger,
  type RpcServer,
  type ServiceBinding,
  serve,
  type TlsServerConfig,
  unimplementedService,
  VmenvError,
} from "@vmenv/rpc";
import { BlockManager } from "./block/manager.js";
import { blockService, packResult as packBlockResult } from "./block/rpc.js";
import type { AgentConfig } from "./config.js";
import { Operations } from "./diagnostics/operations.js";
import { diagnosticsService } from "./diagnostics/rpc.js";
import { effectiveAccelerator } from "./host/accelerator.js";
import { HostInventorySource, probeAccelerators } from "./host/index.js";
import { hostService } from "./host/rpc.js";
import { NetworkManager } from "./network/manager.js";
import { networkService, packResult as packNetworkResult } from "./network/rpc.js";
import { AGENT_VERSION } from "./version.js";
import { CloudHypervisorDriver } from "./vmm/cloud-hypervisor/driver.js";
import { VmManager } from "./vmm/manager.js";
import { QemuDriver } from "./vmm/qemu/driver.js";
import { packResult, vmService } from "./vmm/rpc.js";
import { VmStore } from "./vmm/store.js";

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

  // A failed operation is logged: with its cause when it is not a domain error (the caller only sees
  // "internal error", and is told to look here).
  const operations = new Operations(now, 1000, (op, err) => {
    const line = { operation: `operations/${op.id}`, kind: op.kind, target: op.target };
    if (err instanceof VmenvError)
      logger.warn({ ...line, reason: err.reason, error: err.message }, "operation failed");
    else logger.error({ ...line, err }, "operation failed");
  });
  // Block storage and VMs know each other only through two ports: VMs resolve volume names through the
  // block service, and the block service asks the VMs which of them use a volume.
  let volumeUsers: (volume: string) => string[] = () => [];
  const blocks = new BlockManager({
    stateDir: config.stateDir,
    operations,
    logger,
    now,
    volumeUsers: (v) => volumeUsers(v),
  });
  const networks = new NetworkManager({ stateDir: config.stateDir, logger, now });
  const vms = new VmManager({
    volumes: blocks,
    nics: networks,
    store: new VmStore(config.stateDir),
    drivers: {
      qemu: new QemuDriver({ binary: async () => (await inventory.staticPart()).qemuPath }),
      "cloud-hypervisor": new CloudHypervisorDriver({
        binary: async () =>
          (await inventory.staticPart()).vmms.find((v) => v.kind === "cloud-hypervisor" && v.available)?.path,
      }),
    },
    operations,
    logger,
    effectiveAccelerator: async () => effectiveAccelerator(config.accelerator, await probes),
    hostLimits: async () => {
      const inv = await inventory.read();
      return { cpus: inv.cpu.threads, memoryBytes: inv.memory.totalBytes };
    },
    guestReadyPattern: new RegExp(config.guestReadyPattern),
    now,
  });
  // VM calls wait until the VMs of a previous agent have been found again.
  let vmsReady: () => void = () => undefined;
  const ready = new Promise<void>((resolve) => (vmsReady = resolve));

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
    gate(vmService(vms), ready),
    gate(blockService(blocks), ready),
    gate(networkService(networks), ready),
    unimplementedService(GpuService, issue(5, "GPU passthrough")),
    diagnosticsService(operations, (r) => packBlockResult(r) ?? packNetworkResult(r) ?? packResult(r)),
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
  volumeUsers = (v) => vms.usersOf(v);
  await blocks.init();
  // Taps exist again before the VMs that use them are re-adopted.
  await networks.init();
  await vms.init();
  vmsReady();
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
      // The VMs keep running: the next agent adopts them.
      vms.detachAll();
    },
  };
}

/** Makes every method of `b` wait for `ready` first. */
function gate(b: ServiceBinding, ready: Promise<void>): ServiceBinding {
  const impl: Record<string, unknown> = {};
  for (const m of b.service.methods) {
    const f = b.impl[m.localName] as ((...a: unknown[]) => unknown) | undefined;
    if (!f) continue;
    impl[m.localName] =
      m.methodKind === "server_streaming" || m.methodKind === "bidi_streaming"
        ? async function* (...a: unknown[]) {
            await ready;
            yield* f(...a) as AsyncIterable<unknown>;
          }
        : async (...a: unknown[]) => {
            await ready;
            return f(...a);
          };
  }
  return { service: b.service, impl: impl as ServiceBinding["impl"] };
}
