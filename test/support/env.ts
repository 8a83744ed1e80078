import type { MessageInitShape } from "@bufbuild/protobuf";
import { create } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { ConnectError } from "@connectrpc/connect";
import { BlockService, VmService } from "@vmenv/api/agent/v1";
import {
  AffinityEnforcement,
  AffinityType,
  AgentService,
  type Environment,
  EnvironmentSchema,
  EnvironmentService,
  type MemberSchema,
  type Operation,
  OperationService,
  OperationState,
  ResourceService,
} from "@vmenv/api/coordinator/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { createDaemonClient } from "@vmenv/rpc";
import type { RunningAgent } from "./agent.js";
import { guestImage } from "./guest.js";
import { MIB } from "./vm.js";

/** Clients of a coordinator's services (long deadlines: TCG guests are slow). */
export function coordinatorClients(socket: string) {
  const cfg = { socket, timeoutMs: 120_000 };
  return {
    envs: createDaemonClient(EnvironmentService, cfg),
    ops: createDaemonClient(OperationService, cfg),
    tree: createDaemonClient(ResourceService, cfg),
    agents: createDaemonClient(AgentService, cfg),
  };
}
export type CoordinatorClients = ReturnType<typeof coordinatorClients>;

/** Clients of an agent over its own socket (the test's view of what runs there). */
export function agentClients(a: RunningAgent) {
  const cfg = { socket: a.socket, timeoutMs: 60_000 };
  return { vms: createDaemonClient(VmService, cfg), blocks: createDaemonClient(BlockService, cfg) };
}

/** Waits until a coordinator operation is final and returns it. */
export async function finalOp(c: CoordinatorClients, op: Operation, timeoutMs = 240_000): Promise<Operation> {
  const end = Date.now() + timeoutMs;
  let cur = op;
  while (
    cur.state === OperationState.PENDING ||
    cur.state === OperationState.RUNNING ||
    cur.state === OperationState.ROLLING_BACK
  ) {
    if (Date.now() > end)
      throw new Error(`operation ${op.name} (${op.kind}) not final after ${timeoutMs} ms`);
    cur = await c.ops.waitOperation({ name: op.name, timeout: durationFromMs(30_000) });
  }
  return cur;
}

/** Waits for an operation and fails the test with its error unless it succeeded. */
export async function succeeded(
  c: CoordinatorClients,
  op: Operation | Promise<Operation>,
): Promise<Operation> {
  const done = await finalOp(c, await op);
  if (done.state !== OperationState.SUCCEEDED)
    throw new Error(
      `${done.kind} ${done.target} ended ${OperationState[done.state]}: ${done.error?.message}`,
    );
  return done;
}

/** The Environment an operation produced. */
export function envOf(op: Operation): Environment {
  const e = op.result && anyUnpack(op.result, EnvironmentSchema);
  if (!e) throw new Error(`operation ${op.name} has no Environment result`);
  return e;
}

/** A member running the test guest: 1 vCPU, 128 MiB. */
export async function guestMember(
  id: string,
  role: string,
  opts: { antiAffinityRoles?: string[]; volumeMib?: number } = {},
): Promise<MessageInitShape<typeof MemberSchema>> {
  const { kernel, initrd } = await guestImage();
  return {
    id,
    role,
    spec: {
      vcpus: 1,
      memoryBytes: 128n * MIB,
      boot: {
        method: {
          case: "directKernel",
          value: {
            kernelPath: kernel,
            initrdPath: initrd,
            cmdline: `console=ttyS0 quiet vmenv.hostname=${id}`,
          },
        },
      },
      disks: opts.volumeMib ? [{ id: "data", volume: "volumes/data" }] : [],
    },
    volumes: opts.volumeMib ? [{ id: "data", sizeBytes: BigInt(opts.volumeMib) * MIB }] : [],
    ...(opts.antiAffinityRoles
      ? {
          placement: {
            affinityRules: [
              {
                type: AffinityType.ANTI_AFFINITY,
                enforcement: AffinityEnforcement.HARD,
                roles: opts.antiAffinityRoles,
              },
            ],
          },
        }
      : {}),
  };
}

/** Registers running agents with the coordinator as a1, a2 … and waits until they are READY. */
export async function registerAgents(c: CoordinatorClients, agents: RunningAgent[]): Promise<string[]> {
  const ids: string[] = [];
  for (const [i, a] of agents.entries()) {
    const id = `a${i + 1}`;
    await c.agents.registerAgent({ agentId: id, agent: { address: a.address } });
    ids.push(id);
  }
  return ids;
}

/** The ErrorInfo of a failed call. */
export function errorInfo(err: unknown) {
  const e = ConnectError.from(err);
  return { code: e.code, message: e.rawMessage, info: e.findDetails(ErrorInfoSchema)[0] };
}

/** Rejects unless `p` fails; returns its error. */
export async function failure(p: Promise<unknown>) {
  try {
    await p;
  } catch (err) {
    return errorInfo(err);
  }
  throw new Error("expected the call to fail");
}

/** The VMs (name → state and labels) an agent runs. */
export async function vmsOn(a: RunningAgent) {
  const { vms } = await agentClients(a).vms.listVms({ pageSize: 1000 });
  return vms;
}

export { create };
