import { mkdir, readFile } from "node:fs/promises";
import { networkInterfaces } from "node:os";
import { join } from "node:path";
import {
  createLogger,
  type Logger,
  type RpcServer,
  type ServiceBinding,
  serve,
  type TlsServerConfig,
  VmenvError,
} from "@vmenv/rpc";
import { BlockManager } from "./block/manager.js";
import { blockService, packResult as packBlockResult } from "./block/rpc.js";
import type { AgentConfig } from "./config.js";
import { Diagnostics } from "./diagnostics/index.js";
import { Operations } from "./diagnostics/operations.js";
import { GpuManager } from "./gpu/manager.js";
import { queryNvidiaSmi } from "./gpu/nvidia-smi.js";
import { PciNames } from "./gpu/pci-ids.js";
import { gpuService, packResult as packGpuResult } from "./gpu/rpc.js";
import { SysfsPci } from "./gpu/sysfs.js";
import { effectiveAccelerator } from "./host/accelerator.js";
import { CapacitySource } from "./host/capacity-source.js";
import { HostInventorySource, probeAccelerators } from "./host/index.js";
import { hostService } from "./host/rpc.js";
import { NetworkManager } from "./network/manager.js";
import { networkService, packResult as packNetworkResult } from "./network/rpc.js";
import { AGENT_VERSION } from "./version.js";
import { CloudHypervisorDriver } from "./vmm/cloud-hypervisor/driver.js";
import type { VmRecord } from "./vmm/domain.js";
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
  // Every log line also goes to the diagnostics' ring (StreamLogs), with the operation it was logged for.
  const diagnostics = new Diagnostics(now);
  const logger = createLogger("vmenv-agent", config.logLevel, undefined, diagnostics.loggerExtras);
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
    diagnostics.errors.recordOperation(op, err);
    const line = { operation: `operations/${op.id}`, kind: op.kind, target: op.target };
    if (err instanceof VmenvError)
      logger.warn({ ...line, reason: err.reason, error: err.message }, "operation failed");
    else logger.error({ ...line, err }, "operation failed");
  });
  // Block storage and VMs know each other only through two ports: VMs resolve volume names through the
  // block service, and the block service asks the VMs which of them use a volume.
  let volumeUsers: (volume: string) => string[] = () => [];
  // Storage daemons follow the VMs that have their volume open; a live resize goes through those VMMs.
  let activeUsers: (volume: string) => string[] = () => [];
  let liveResize: (volume: string, size: bigint) => Promise<string[]> = async () => [];
  const blocks = new BlockManager({
    stateDir: config.stateDir,
    operations,
    logger,
    now,
    volumeUsers: (v) => volumeUsers(v),
    activeUsers: (v) => activeUsers(v),
    liveResize: (v, size) => liveResize(v, size),
  });
  const networks = new NetworkManager({ stateDir: config.stateDir, logger, now });
  // GPUs and VMs know each other through two ports: a VM checks that its GPU is assigned to it and on
  // vfio-pci, and a GPU is not released while a VM has it bound.
  let gpuUsers: (gpu: string) => string[] = () => [];
  const gpus = new GpuManager({
    pci: new SysfsPci(config.sysfsRoot),
    names: new PciNames("/usr/share/misc/pci.ids"),
    vendor: () => queryNvidiaSmi(config.nvidiaSmi),
    stateDir: config.stateDir,
    operations,
    logger,
    now,
    boundBy: (g) => gpuUsers(g),
  });
  // The VMs are known once VmManager exists; capacity reads them at each call.
  let allVms: () => readonly VmRecord[] = () => [];
  const capacity = new CapacitySource({
    inventory: () => inventory.read(),
    vms: () => allVms(),
    gpus: () => gpus.list(),
    settings: {
      cpuOvercommit: config.cpuOvercommit,
      reservedCpus: config.reservedCpus,
      reservedMemoryBytes: BigInt(config.reservedMemoryMib) * 1024n * 1024n,
    },
  });
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
    gpus,
    capacity: () => capacity.checker(),
    // Live migration: the incoming VMM listens where the agent does; volumes and networks come from
    // their services (docs/adr/0015).
    migration: {
      listenHost: migrationHost(config.listen?.host),
      networkExists: (n) =>
        networks.getNetwork(n.replace(/^networks\//, "")).then(
          () => true,
          () => false,
        ),
      findVolume: (name) =>
        blocks.resolve(name).catch((err: unknown) => {
          if (err instanceof VmenvError && err.reason === "VOLUME_NOT_FOUND") return undefined;
          throw err;
        }),
      createVolume: async (v) => {
        const op = await blocks.create(v.name.replace(/^volumes\//, ""), {
          store: v.store.replace(/^stores\//, ""),
          format: v.format,
          sizeBytes: v.sizeBytes,
          backend: v.backend,
          labels: v.labels,
          preallocate: false,
        });
        const end = await operations.wait(op.id, 600_000);
        if (end.state !== "succeeded") throw end.error ?? new Error(`creating ${v.name} did not finish`);
      },
      deleteVolume: async (name) => {
        const op = await blocks.delete(name.replace(/^volumes\//, ""), { allowMissing: true, force: true });
        const end = await operations.wait(op.id, 60_000);
        if (end.state === "failed") throw end.error ?? new Error(`deleting ${name} failed`);
      },
    },
  });
  allVms = () => vms.list();
  gpuUsers = (g) => vms.gpuUsersOf(g);
  // VM calls wait until the VMs of a previous agent have been found again.
  let vmsReady: () => void = () => undefined;
  const ready = new Promise<void>((resolve) => (vmsReady = resolve));

  const services = [
    hostService({
      inventory: () => inventory.read(),
      accelerators: () => probes,
      setting: config.accelerator,
      version: AGENT_VERSION,
      startTimeMs,
      now,
      capacity: () => capacity.snapshot(),
    }),
    gate(vmService(vms), ready),
    gate(blockService(blocks), ready),
    gate(networkService(networks), ready),
    gate(gpuService(gpus), ready),
    diagnostics.service({
      operations,
      vms,
      pack: (r) => packBlockResult(r) ?? packNetworkResult(r) ?? packGpuResult(r) ?? packResult(r),
    }),
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
  await gpus.init();
  await vms.init();
  // With the VMs known: adopted storage daemons nobody uses stop, dead ones in use restart. Then they
  // follow every VM change, and a slow tick catches daemons that died between changes.
  activeUsers = (v) => vms.activeUsersOf(v);
  liveResize = (v, size) => vms.resizeVolumeLive(v, size);
  await blocks.reconcileDaemons();
  vms.on("change", () => blocks.scheduleReconcile());
  const daemonTick = setInterval(() => blocks.scheduleReconcile(), 10_000);
  daemonTick.unref();
  vmsReady();
  const metricsAddress = await diagnostics.start({
    operations,
    vms,
    logger,
    metricsListen: config.metricsListen,
  });
  logger.info(
    {
      version: AGENT_VERSION,
      unixSocket: server.unixSocket,
      tcpAddress: server.tcpAddress,
      tls: tls !== undefined,
      metricsAddress,
    },
    "vmenv-agent ready",
  );
  return {
    logger,
    server,
    stop: async () => {
      stopProbes.abort();
      await Promise.all([server.close(config.shutdownGraceMs), probesDone, diagnostics.stop()]);
      // The VMs and storage daemons keep running: the next agent adopts them.
      clearInterval(daemonTick);
      vms.detachAll();
      blocks.detachDaemons();
    },
  };
}

/**
 * The address an incoming migration listens on: the agent's TCP host; for a wildcard (or no TCP
 * listener), the host's first external IPv4 address, else loopback.
 */
function migrationHost(listen: string | undefined): string {
  if (listen && listen !== "0.0.0.0" && listen !== "::" && listen !== "[::]")
    return listen.replace(/^\[(.*)\]$/, "$1");
  const external = Object.values(networkInterfaces())
    .flat()
    .find((a) => a && a.family === "IPv4" && !a.internal);
  return external?.address ?? "127.0.0.1";
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
