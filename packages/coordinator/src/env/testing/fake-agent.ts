import { create, type Message } from "@bufbuild/protobuf";
import { anyPack } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Operation as AgentOperation,
  OperationSchema as AgentOperationSchema,
  OperationState as AgentOpState,
  HostInfoSchema,
  type Vm,
  VmMigrationPhase,
  VmMigrationProgressSchema,
  VmMigrationTargetSchema,
  VmSchema,
  VmState,
  type Volume,
  VolumeSchema,
  VolumeState,
} from "@vmenv/api/agent/v1";
import type { AgentClients } from "../../ports.js";

const MIB = 1024n * 1024n;

/**
 * An agent in memory for the environment unit tests: VMs (with the spec they were created with) and
 * volumes in maps, every operation done at once (and kept, so WaitOperation returns it as it ended);
 * `log` lists the creations and deletions. `failCreateVm` makes CreateVm's operation fail. For a real
 * Fleet it answers heartbeats (GetHostInfo with `capacity`, ListNetworks with `networks`) while
 * `reachable`.
 */
export class FakeAgent {
  readonly vms = new Map<string, Vm>();
  readonly volumes = new Map<string, Volume>();
  readonly ops = new Map<string, AgentOperation>();
  readonly log: string[] = [];
  failCreateVm = false;
  /** Whether heartbeats reach it. */
  reachable = true;
  /** What it offers to VMs (HostInfo.capacity). */
  capacity = { vcpus: 8, memoryBytes: 4096n * MIB };
  /** What ListNetworks reports. */
  networks: Array<{ name: string; cidr: string; gateway: string; uplink: string }> = [];
  #n = 0;
  constructor(readonly id: string) {}

  /** Records a finished agent operation: failed with `error`, or succeeded with `result`/`metadata`. */
  protected op(
    kind: string,
    target: string,
    opts: { error?: string; errorCode?: Code; result?: Message; metadata?: Message } = {},
  ): AgentOperation {
    const op = create(AgentOperationSchema, {
      name: `operations/${this.id}-${++this.#n}`,
      kind,
      target,
      state: opts.error ? AgentOpState.FAILED : AgentOpState.SUCCEEDED,
      ...(opts.error ? { error: { code: opts.errorCode ?? Code.Internal, message: opts.error } } : {}),
      ...(opts.result ? { result: anyPack(VmMigrationTargetSchema, opts.result as never) } : {}),
      ...(opts.metadata ? { metadata: anyPack(VmMigrationProgressSchema, opts.metadata as never) } : {}),
    });
    this.ops.set(op.name, op);
    return op;
  }

  protected vm(name: string): Vm {
    const vm = this.vms.get(name);
    if (!vm) throw new ConnectError(`${name} not found`, Code.NotFound);
    return vm;
  }

  /** Defines VM `name` from a request's labels and spec, in `state`. */
  protected define(name: string, vm: Pick<Vm, "labels" | "spec">, state: VmState): void {
    this.vms.set(
      name,
      create(VmSchema, {
        name,
        labels: { ...vm.labels },
        ...(vm.spec ? { spec: vm.spec } : {}),
        state,
        etag: "1",
      }),
    );
  }

  /** VMs that run (the guest executes) here. */
  running(): string[] {
    return [...this.vms.values()].filter((v) => v.state === VmState.RUNNING).map((v) => v.name);
  }

  protected vmMethods(): Record<string, unknown> {
    return {
      getVm: async (r: { name: string }) => this.vm(r.name),
      listVms: async () => ({ vms: [...this.vms.values()], nextPageToken: "" }),
      createVm: async (r: { vmId: string; vm: Pick<Vm, "labels" | "spec"> }) => {
        const name = `vms/${r.vmId}`;
        if (this.failCreateVm) return this.op("vm.create", name, { error: "no room for the VMM" });
        if (!this.vms.has(name)) {
          this.define(name, r.vm, VmState.STOPPED);
          this.log.push(`+${name}`);
        }
        return this.op("vm.create", name);
      },
      startVm: async (r: { name: string; paused?: boolean }) => {
        this.vm(r.name).state = r.paused ? VmState.PAUSED : VmState.RUNNING;
        return this.op("vm.start", r.name);
      },
      stopVm: async (r: { name: string }) => {
        this.vm(r.name).state = VmState.STOPPED;
        return this.op("vm.stop", r.name);
      },
      pauseVm: async (r: { name: string }) => {
        const vm = this.vm(r.name);
        vm.state = VmState.PAUSED;
        return vm;
      },
      resumeVm: async (r: { name: string }) => {
        const vm = this.vm(r.name);
        vm.state = VmState.RUNNING;
        return vm;
      },
      deleteVm: async (r: { name: string }) => {
        if (this.vms.delete(r.name)) this.log.push(`-${r.name}`);
        return this.op("vm.delete", r.name);
      },
      updateVm: async (r: { vm: { name: string; labels: Record<string, string> } }) => {
        const vm = this.vm(r.vm.name);
        vm.labels = { ...r.vm.labels };
        return vm;
      },
    };
  }

  protected diagnosticsMethods(): Record<string, unknown> {
    return {
      getOperation: async (r: { name: string }) => this.ops.get(r.name),
      waitOperation: async (r: { name: string }) => this.ops.get(r.name),
    };
  }

  protected hostMethods(): Record<string, unknown> {
    const unreachable = () =>
      new ConnectError(`cannot reach ${this.id}: connection refused`, Code.Unavailable);
    return {
      getHostInfo: async () => {
        if (!this.reachable) throw unreachable();
        return create(HostInfoSchema, {
          hostname: this.id,
          capacity: {
            vcpusAllocatable: this.capacity.vcpus,
            memoryAllocatableBytes: this.capacity.memoryBytes,
          },
        });
      },
    };
  }

  clients(): AgentClients {
    const blocks = {
      getVolume: async (r: { name: string }) => {
        const v = this.volumes.get(r.name);
        if (!v) throw new ConnectError(`${r.name} not found`, Code.NotFound);
        return v;
      },
      listVolumes: async () => ({ volumes: [...this.volumes.values()], nextPageToken: "" }),
      listStores: async () => ({ stores: [], nextPageToken: "" }),
      createVolume: async (r: {
        volumeId: string;
        volume: { sizeBytes: bigint; labels: Record<string, string> };
      }) => {
        const name = `volumes/${r.volumeId}`;
        if (!this.volumes.has(name)) {
          this.volumes.set(
            name,
            create(VolumeSchema, {
              name,
              sizeBytes: r.volume.sizeBytes,
              labels: { ...r.volume.labels },
              state: VolumeState.READY,
            }),
          );
          this.log.push(`+${name}`);
        }
        return this.op("volume.create", name);
      },
      deleteVolume: async (r: { name: string }) => {
        if (this.volumes.delete(r.name)) this.log.push(`-${r.name}`);
        return this.op("volume.delete", r.name);
      },
    };
    return {
      vms: this.vmMethods(),
      blocks,
      diagnostics: this.diagnosticsMethods(),
      host: this.hostMethods(),
      networks: {
        listNetworks: async () => ({ networks: this.networks.map((n) => ({ ...n })), nextPageToken: "" }),
      },
    } as unknown as AgentClients;
  }
}

/**
 * A FakeAgent that also speaks the migration protocol: PrepareVmMigration defines the VM MIGRATING,
 * MigrateVm leaves the source paused in MIGRATING (progress as metadata), FinishVmMigration runs the
 * destination, ResumeVm rolls the source back. `fail` makes one call fail ("deleteVm", "prepare",
 * "migrate", "finish", "finish-after-start"); `cancelled` lists the agent operations cancelled.
 */
export class MigratingFakeAgent extends FakeAgent {
  readonly fail = new Set<string>();
  /** A sent source's state before it was sent: ResumeVm of it goes back to that, as the agent does. */
  readonly sentFrom = new Map<string, VmState>();
  cancelled: string[] = [];
  protected override vmMethods(): Record<string, unknown> {
    const base = super.vmMethods() as { deleteVm: (r: { name: string }) => Promise<unknown> };
    return {
      ...base,
      deleteVm: async (r: { name: string }) => {
        if (this.fail.has("deleteVm")) throw new ConnectError("disk on fire", Code.Internal);
        return base.deleteVm(r);
      },
      prepareVmMigration: async (r: { vmId: string; vm: Pick<Vm, "labels" | "spec"> }) => {
        const name = `vms/${r.vmId}`;
        if (this.fail.has("prepare")) throw new ConnectError("no incoming VMM", Code.FailedPrecondition);
        this.define(name, r.vm, VmState.MIGRATING);
        return this.op("vm.prepare_migration", name, {
          result: create(VmMigrationTargetSchema, { vm: name, migrationUri: `tcp:${this.id}:4444` }),
        });
      },
      resumeVm: async (r: { name: string }) => {
        const vm = this.vm(r.name);
        vm.state = this.sentFrom.get(r.name) ?? VmState.RUNNING;
        this.sentFrom.delete(r.name);
        return vm;
      },
      migrateVm: async (r: { name: string; migrationUri: string }) => {
        const vm = this.vm(r.name);
        if (this.fail.has("migrate"))
          return this.op("vm.migrate", r.name, {
            error: "the destination closed the stream",
            errorCode: Code.Aborted,
          });
        this.sentFrom.set(r.name, vm.state);
        vm.state = VmState.MIGRATING;
        return this.op("vm.migrate", r.name, {
          metadata: create(VmMigrationProgressSchema, {
            phase: VmMigrationPhase.COMPLETED,
            memoryTransferredBytes: 128n * MIB,
            memoryTotalBytes: 128n * MIB,
          }),
        });
      },
      finishVmMigration: async (r: { name: string; paused?: boolean }) => {
        if (this.fail.has("finish"))
          return this.op("vm.finish_migration", r.name, { error: "VMM died", errorCode: Code.Aborted });
        if (this.fail.has("finish-after-start")) {
          this.vm(r.name).state = VmState.RUNNING;
          return this.op("vm.finish_migration", r.name, {
            error: "lost the answer",
            errorCode: Code.Aborted,
          });
        }
        this.vm(r.name).state = r.paused ? VmState.PAUSED : VmState.RUNNING;
        return this.op("vm.finish_migration", r.name);
      },
    };
  }
  protected override diagnosticsMethods(): Record<string, unknown> {
    return {
      ...super.diagnosticsMethods(),
      // "forget-ops": the agent restarted, and its operations are gone (as a real agent's are).
      waitOperation: async (r: { name: string }) => {
        if (this.fail.has("forget-ops")) throw new ConnectError(`${r.name} not found`, Code.NotFound);
        return this.ops.get(r.name);
      },
      cancelOperation: async (r: { name: string }) => {
        if (this.fail.has("forget-ops")) throw new ConnectError(`${r.name} not found`, Code.NotFound);
        this.cancelled.push(r.name);
        throw new ConnectError("finished", Code.FailedPrecondition);
      },
    };
  }
}
