/**
 * What environment operations do on an agent, each idempotent ("measure, then act, then verify"): the
 * resource is read first, and only what is missing is done. Every mutation carries a request id derived
 * from the step's (stable across attempts and resumes), one per call, so an agent that saw the call
 * already returns its first operation instead of acting twice.
 *
 * A VM or volume is the coordinator's when it carries the labels of `model.ownLabels`; one with the
 * same id but without them is someone else's and is never touched (ALREADY_EXISTS when we need the id).
 */
import { create, fromJson, type JsonValue as PbJson } from "@bufbuild/protobuf";
import { anyUnpack, durationFromMs } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  type Operation as AgentOperation,
  OperationState as AgentOpState,
  type Vm,
  VmSchema,
  VmSpecSchema,
  VmState,
  type Volume,
  VolumeFormat,
  VolumeState,
} from "@vmenv/api/agent/v1";
import { ErrorInfoSchema } from "@vmenv/api/google/rpc";
import { type ErrorCode, VmenvError } from "@vmenv/rpc/errors";
import type { AgentClients } from "../ports.js";
import {
  isOurs,
  type MemberRecord,
  OUTPUT_LABEL_PREFIX,
  ownLabels,
  type VolumeRecord,
  vmId,
  volumeId,
} from "./model.js";

/** One agent, as a step sees it. */
export interface AgentTarget {
  /** Bare agent id, for messages. */
  id: string;
  clients: AgentClients;
  /** Records the agent operation a step started (shown in the step). */
  record?: (operation: string) => Promise<void>;
  signal?: AbortSignal;
}

const codeNames: Partial<Record<Code, ErrorCode>> = {
  [Code.InvalidArgument]: "invalid-argument",
  [Code.NotFound]: "not-found",
  [Code.AlreadyExists]: "already-exists",
  [Code.FailedPrecondition]: "failed-precondition",
  [Code.ResourceExhausted]: "resource-exhausted",
  [Code.Aborted]: "aborted",
  [Code.Unavailable]: "unavailable",
  [Code.DeadlineExceeded]: "deadline-exceeded",
  [Code.Canceled]: "cancelled",
  [Code.Unimplemented]: "unimplemented",
};

export const isNotFound = (err: unknown) => err instanceof ConnectError && err.code === Code.NotFound;

async function getOrUndefined<T>(p: Promise<T>): Promise<T | undefined> {
  try {
    return await p;
  } catch (err) {
    if (isNotFound(ConnectError.from(err))) return undefined;
    throw err;
  }
}

/** Waits for an agent operation to end; throws its error (code, reason and metadata kept, agent named). */
export async function waitAgentOp(a: AgentTarget, op: AgentOperation): Promise<AgentOperation> {
  if (a.record && op.state !== AgentOpState.SUCCEEDED) await a.record(op.name);
  let cur = op;
  while (cur.state === AgentOpState.RUNNING || cur.state === AgentOpState.PENDING) {
    cur = await a.clients.diagnostics.waitOperation(
      { name: op.name, timeout: durationFromMs(30_000) },
      { timeoutMs: 40_000, ...(a.signal ? { signal: a.signal } : {}) },
    );
  }
  if (cur.state === AgentOpState.SUCCEEDED) return cur;
  const st = cur.error;
  let reason = "AGENT_OPERATION_FAILED";
  let metadata: Record<string, string> = {};
  for (const d of st?.details ?? []) {
    const info = anyUnpack(d, ErrorInfoSchema);
    if (info) {
      reason = info.reason || reason;
      metadata = { ...info.metadata };
    }
  }
  throw new VmenvError(
    codeNames[(st?.code ?? Code.Internal) as Code] ?? "internal",
    `agents/${a.id}: ${cur.kind} ${cur.target} ${AgentOpState[cur.state]?.toLowerCase()}: ${st?.message ?? "no reason given"}`,
    { reason, metadata: { ...metadata, agent: `agents/${a.id}`, agentOperation: cur.name } },
  );
}

function taken(kind: "vm" | "volume", name: string, agent: string): VmenvError {
  return new VmenvError(
    "already-exists",
    `${name} already exists on agents/${agent} and is not this coordinator's (it lacks its labels)`,
    { reason: `${kind.toUpperCase()}_ALREADY_EXISTS`, metadata: { [kind]: name, agent: `agents/${agent}` } },
  );
}

// ---- volumes -------------------------------------------------------------------------------------

async function chooseStore(a: AgentTarget, v: VolumeRecord): Promise<string> {
  const want = Object.entries(v.storeLabels);
  if (want.length === 0) return "stores/default";
  const { stores } = await a.clients.blocks.listStores({ pageSize: 1000 });
  const fits = stores
    .filter((s) => want.every(([k, x]) => s.labels[k] === x))
    .sort((x, y) => (y.freeBytes > x.freeBytes ? 1 : y.freeBytes < x.freeBytes ? -1 : 0));
  const best = fits[0];
  if (!best)
    throw new VmenvError(
      "failed-precondition",
      `agents/${a.id} has no store with labels ${want.map(([k, x]) => `${k}=${x}`).join(",")}`,
      { reason: "NO_STORE_FITS", metadata: { agent: `agents/${a.id}`, volume: v.id } },
    );
  return best.name;
}

/** Creates (or imports) a member's volume unless it exists; returns the agent's volume. */
export async function ensureVolume(
  a: AgentTarget,
  env: string,
  member: string,
  v: VolumeRecord,
  requestId: string,
): Promise<Volume> {
  const id = volumeId(env, member, v.id);
  const name = `volumes/${id}`;
  const have = await getOrUndefined(a.clients.blocks.getVolume({ name }));
  if (have && !isOurs(have.labels, env, member)) throw taken("volume", name, a.id);
  if (have?.state === VolumeState.READY) return have;
  const volume = {
    store: await chooseStore(a, v),
    sizeBytes: BigInt(v.sizeBytes || "0"),
    format: v.format
      ? (VolumeFormat[v.format as keyof typeof VolumeFormat] ?? VolumeFormat.QCOW2)
      : VolumeFormat.QCOW2,
    labels: ownLabels(env, member),
  };
  // Creating, or not there: (re)issue the call; a request id the agent saw returns its first operation.
  const op = v.imageUri
    ? await a.clients.blocks.importVolume({ volumeId: id, volume, sourceUri: v.imageUri, requestId })
    : await a.clients.blocks.createVolume({ volumeId: id, volume, requestId });
  await waitAgentOp(a, op);
  return a.clients.blocks.getVolume({ name });
}

/** Deletes a volume of ours; a missing one (or someone else's) is left as is. */
export async function deleteVolume(
  a: AgentTarget,
  env: string,
  member: string,
  volume: string,
  requestId: string,
) {
  const name = `volumes/${volumeId(env, member, volume)}`;
  const have = await getOrUndefined(a.clients.blocks.getVolume({ name }));
  if (!have || !isOurs(have.labels, env, member)) return;
  await waitAgentOp(
    a,
    await a.clients.blocks.deleteVolume({ name, force: true, allowMissing: true, requestId }),
  );
}

// ---- VMs -----------------------------------------------------------------------------------------

/** The member's spec with its disks pointing at the volumes created for it. */
export function agentSpec(env: string, m: Pick<MemberRecord, "id" | "spec" | "volumes">) {
  const spec = fromJson(VmSpecSchema, m.spec as PbJson);
  const ids = new Set(m.volumes.map((v) => v.id));
  for (const d of spec.disks) {
    const vol = /^volumes\/(.+)$/.exec(d.volume)?.[1];
    if (vol && ids.has(vol)) d.volume = `volumes/${volumeId(env, m.id, vol)}`;
  }
  return spec;
}

/** The labels of a member's VM: ours, plus its outputs as `vmenv.dev/<key>`. */
export function vmLabels(env: string, m: Pick<MemberRecord, "id" | "outputs">): Record<string, string> {
  const out = ownLabels(env, m.id);
  for (const [k, v] of Object.entries(m.outputs)) out[`${OUTPUT_LABEL_PREFIX}${k}`] = v;
  return out;
}

export async function getVm(a: AgentTarget, env: string, member: string): Promise<Vm | undefined> {
  const vm = await getOrUndefined(a.clients.vms.getVm({ name: `vms/${vmId(env, member)}` }));
  if (vm && !isOurs(vm.labels, env, member)) throw taken("vm", vm.name, a.id);
  return vm;
}

/** Creates the member's VM (stopped) unless it exists. */
export async function ensureVm(a: AgentTarget, env: string, m: MemberRecord, requestId: string): Promise<Vm> {
  const have = await getVm(a, env, m.id);
  if (have && have.state !== VmState.CREATING) return have;
  const op = await a.clients.vms.createVm({
    vmId: vmId(env, m.id),
    vm: { spec: agentSpec(env, m), labels: vmLabels(env, m) },
    start: false,
    requestId,
  });
  await waitAgentOp(a, op);
  return a.clients.vms.getVm({ name: `vms/${vmId(env, m.id)}` });
}

async function settle(
  a: AgentTarget,
  env: string,
  member: string,
  ok: (s: VmState) => boolean,
  what: string,
) {
  for (let i = 0; i < 600; i++) {
    const vm = await getVm(a, env, member);
    if (!vm) throw vmGone(a, env, member);
    if (ok(vm.state)) return vm;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new VmenvError(
    "deadline-exceeded",
    `vms/${vmId(env, member)} on agents/${a.id} did not become ${what}`,
    {
      reason: "VM_STATE_TIMEOUT",
      metadata: { vm: `vms/${vmId(env, member)}`, agent: `agents/${a.id}` },
    },
  );
}

function vmGone(a: AgentTarget, env: string, member: string): VmenvError {
  return new VmenvError("failed-precondition", `vms/${vmId(env, member)} is missing on agents/${a.id}`, {
    reason: "MEMBER_VM_MISSING",
    metadata: { vm: `vms/${vmId(env, member)}`, agent: `agents/${a.id}`, member },
  });
}

/** Boots the member's VM (resumes it when paused) and waits until it runs. */
export async function startVm(a: AgentTarget, env: string, member: string, requestId: string): Promise<Vm> {
  const vm = await getVm(a, env, member);
  if (!vm) throw vmGone(a, env, member);
  if (vm.state === VmState.RUNNING) return vm;
  if (vm.state === VmState.PAUSED) return a.clients.vms.resumeVm({ name: vm.name, requestId });
  if (vm.state === VmState.STOPPED || vm.state === VmState.CRASHED)
    await waitAgentOp(a, await a.clients.vms.startVm({ name: vm.name, requestId }));
  return settle(a, env, member, (s) => s === VmState.RUNNING, "RUNNING");
}

/** Stops the member's VM (gracefully unless `force`) and waits until it is stopped. */
export async function stopVm(
  a: AgentTarget,
  env: string,
  member: string,
  requestId: string,
  opts: { force?: boolean; gracefulMs?: number } = {},
): Promise<Vm | undefined> {
  const vm = await getVm(a, env, member);
  if (!vm) return undefined;
  if (vm.state === VmState.STOPPED || vm.state === VmState.CRASHED) return vm;
  await waitAgentOp(
    a,
    await a.clients.vms.stopVm({
      name: vm.name,
      force: opts.force ?? false,
      ...(opts.gracefulMs ? { gracefulTimeout: durationFromMs(opts.gracefulMs) } : {}),
      requestId,
    }),
  );
  return settle(a, env, member, (s) => s === VmState.STOPPED || s === VmState.CRASHED, "STOPPED");
}

/** Pauses a running member's VM; a VM that does not run is left as it is. */
export async function pauseVm(a: AgentTarget, env: string, member: string, requestId: string) {
  const vm = await getVm(a, env, member);
  if (!vm) throw vmGone(a, env, member);
  if (vm.state !== VmState.RUNNING) return vm;
  return a.clients.vms.pauseVm({ name: vm.name, requestId });
}

/** Resumes a paused member's VM; a VM that is not paused is left as it is. */
export async function resumeVm(a: AgentTarget, env: string, member: string, requestId: string) {
  const vm = await getVm(a, env, member);
  if (!vm) throw vmGone(a, env, member);
  if (vm.state !== VmState.PAUSED) return vm;
  return a.clients.vms.resumeVm({ name: vm.name, requestId });
}

/** Deletes the member's VM (killing its VMM); a missing one is no error. */
export async function deleteVm(
  a: AgentTarget,
  env: string,
  member: string,
  requestId: string,
): Promise<void> {
  const name = `vms/${vmId(env, member)}`;
  const have = await getOrUndefined(a.clients.vms.getVm({ name }));
  if (!have || !isOurs(have.labels, env, member)) return;
  await waitAgentOp(a, await a.clients.vms.deleteVm({ name, force: true, allowMissing: true, requestId }));
}

/**
 * Makes the VM's output labels (`vmenv.dev/<key>`) equal the member's outputs; other labels stay.
 * Returns whether it changed anything.
 */
export async function syncOutputs(
  a: AgentTarget,
  env: string,
  m: MemberRecord,
  requestId: string,
): Promise<boolean> {
  const vm = await getVm(a, env, m.id);
  if (!vm) return false;
  const own = new Set(Object.keys(ownLabels(env, m.id)));
  const want: Record<string, string> = {};
  for (const [k, v] of Object.entries(vm.labels))
    if (own.has(k) || !k.startsWith(OUTPUT_LABEL_PREFIX)) want[k] = v;
  Object.assign(want, vmLabels(env, m));
  const same =
    Object.keys(want).length === Object.keys(vm.labels).length &&
    Object.entries(want).every(([k, v]) => vm.labels[k] === v);
  if (same) return false;
  await a.clients.vms.updateVm({
    vm: create(VmSchema, { name: vm.name, labels: want, etag: vm.etag }),
    updateMask: { paths: ["labels"] },
    requestId,
  });
  return true;
}
