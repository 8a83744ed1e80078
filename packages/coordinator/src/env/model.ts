/**
 * Environments as the coordinator stores them (`env/{id}`), and the pure rules about them: member
 * usage, the environment's state derived from its members, the ids of what a member creates on its
 * agent, and the labels that mark those as the coordinator's. No I/O, no generated types: a member's VM
 * spec is kept as the API's protobuf JSON (`spec`), opaque here except for the few figures usage needs.
 */
import { invalidArgument } from "@vmenv/rpc/errors";
import { addUsage, type StoredUsage, type Usage, usageFromStore, ZERO_USAGE } from "../domain/usage.js";
import type { JsonValue } from "../store/store.js";

/** MemberState of the API, without its prefix. */
export type MemberStateName =
  | "PENDING"
  | "CREATING"
  | "STOPPED"
  | "STARTING"
  | "RUNNING"
  | "PAUSED"
  | "STOPPING"
  | "MIGRATING"
  | "LOST"
  | "FAILED"
  | "DELETING";

/** EnvironmentState of the API, without its prefix. */
export type EnvStateName =
  | "CREATING"
  | "STOPPED"
  | "STARTING"
  | "RUNNING"
  | "STOPPING"
  | "SUSPENDED"
  | "MIGRATING"
  | "DEGRADED"
  | "DELETING"
  | "FAILED";

/** A volume the coordinator creates for a member. */
export interface VolumeRecord {
  [k: string]: JsonValue | undefined;
  id: string;
  /** Bytes, decimal string. */
  sizeBytes: string;
  /** VolumeFormat name ("QCOW2", "RAW") or "" for unset. */
  format: string;
  imageUri: string;
  storeLabels: Record<string, string>;
}

/** One member as stored. */
export interface MemberRecord {
  [k: string]: JsonValue | undefined;
  id: string;
  role: string;
  kind: string;
  priority: number;
  /** vmenv.agent.v1.VmSpec as protobuf JSON (toJson). */
  spec: JsonValue;
  volumes: VolumeRecord[];
  /** vmenv.coordinator.v1.Placement as protobuf JSON, or null. */
  placement: JsonValue;
  /** vmenv.coordinator.v1.ReschedulePolicy as protobuf JSON, or null. */
  reschedulePolicy: JsonValue;
  state: MemberStateName;
  stateMessage: string;
  /** Bare agent id; "" while PENDING. */
  agent: string;
  /** Bare VM id on the agent; "" until its VM exists. */
  vm: string;
  /** Kind-specific attributes hooks set (a balancer's `upstreams`). */
  outputs: Record<string, string>;
  /** The member a hook added this one for (a balancer: "" when a user added it). */
  addedBy: string;
}

/** An environment as stored at `env/{id}`. */
export interface EnvRecord {
  [k: string]: JsonValue | undefined;
  id: string;
  /** Bare tree path ("acme/web"): the tree's DeleteNode scans for it. */
  node: string;
  description: string;
  labels: Record<string, string>;
  /** In priority order. */
  members: MemberRecord[];
  /** An operation's passing state (CREATING, STARTING …), "" when none: the state then follows the members. */
  transition: EnvStateName | "";
  /** A sticky state (FAILED) that only a delete clears. */
  failed: boolean;
  stateMessage: string;
  /** Id of the operation that created it, and the fingerprint of its request (for idempotent creates). */
  createOp: string;
  fingerprint: string;
  createMs: number;
  updateMs: number;
}

/** Labels every VM and volume the coordinator creates carries. */
export const LABEL_ENV = "vmenv.dev/environment";
export const LABEL_MEMBER = "vmenv.dev/member";
export const LABEL_MANAGED = "vmenv.dev/managed-by";
export const MANAGED_BY = "vmenv-coordinator";
/** Prefix of the labels that carry a member's outputs on its VM, e.g. `vmenv.dev/upstreams`. */
export const OUTPUT_LABEL_PREFIX = "vmenv.dev/";

export function ownLabels(env: string, member: string): Record<string, string> {
  return { [LABEL_ENV]: env, [LABEL_MEMBER]: member, [LABEL_MANAGED]: MANAGED_BY };
}

/** Whether labels mark a VM or volume as the coordinator's for `env`/`member`. */
export function isOurs(labels: Record<string, string>, env: string, member: string): boolean {
  return labels[LABEL_MANAGED] === MANAGED_BY && labels[LABEL_ENV] === env && labels[LABEL_MEMBER] === member;
}

// ---- ids -----------------------------------------------------------------------------------------

/** Environment ids follow the VM id rules (the agent's): they become part of VM ids. */
export const ENV_ID = /^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$/;
/** Member ids: 1 to 32 lower-case letters, digits and '-', starting with a letter, not ending with '-'. */
export const MEMBER_ID = /^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$/;
/** Volume ids within a member: like member ids. */
export const VOLUME_ID = MEMBER_ID;
/** The agent's id limit for VMs and volumes. */
export const AGENT_ID_MAX = 63;

/** The member's VM id on its agent. */
export const vmId = (env: string, member: string) => `${env}-${member}`;
/** The id of a member's volume on its agent. */
export const volumeId = (env: string, member: string, volume: string) => `${env}-${member}-${volume}`;

/**
 * Checks that the ids an environment's member makes on its agent fit the agent's id rules; throws
 * INVALID_ARGUMENT naming `field` otherwise.
 */
export function checkDerivedIds(env: string, member: string, volumes: string[], field: string): void {
  const vm = vmId(env, member);
  if (vm.length > AGENT_ID_MAX)
    throw invalidArgument(
      field,
      `VM id "${vm}" (environment id + "-" + member id) is ${vm.length} characters; the agent allows ${AGENT_ID_MAX}: use shorter ids`,
      "ID_TOO_LONG",
    );
  for (const v of volumes) {
    const vol = volumeId(env, member, v);
    if (vol.length > AGENT_ID_MAX)
      throw invalidArgument(
        field,
        `volume id "${vol}" (environment + member + volume ids) is ${vol.length} characters; the agent allows ${AGENT_ID_MAX}: use shorter ids`,
        "ID_TOO_LONG",
      );
  }
}

// ---- usage ---------------------------------------------------------------------------------------

interface SpecFigures {
  vcpus?: number;
  maxVcpus?: number;
  memoryBytes?: string;
  maxMemoryBytes?: string;
  gpus?: unknown[];
}

/**
 * What a member takes: 1 VM, vCPUs = max(vcpus, max_vcpus), memory = max(memory, max_memory), block =
 * the sum of its volumes' sizes, GPUs = its GPU devices (GPU memory is not known before placement: 0).
 */
export function memberUsage(m: Pick<MemberRecord, "spec" | "volumes">): Usage {
  const s = (m.spec ?? {}) as SpecFigures;
  const big = (x: string | undefined) => BigInt(x ?? "0");
  const mem = big(s.memoryBytes);
  const maxMem = big(s.maxMemoryBytes);
  return {
    vms: 1,
    vcpus: Math.max(s.vcpus ?? 0, s.maxVcpus ?? 0),
    // biome-ignore lint/complexity/useMathMinMax: bigint (Math.max takes numbers only)
    memoryBytes: maxMem > mem ? maxMem : mem,
    blockBytes: m.volumes.reduce((sum, v) => sum + BigInt(v.sizeBytes || "0"), 0n),
    gpus: s.gpus?.length ?? 0,
    gpuMemoryBytes: 0n,
  };
}

/** The sum of the members' usage. */
export function envUsage(members: ReadonlyArray<Pick<MemberRecord, "spec" | "volumes">>): Usage {
  return members.reduce<Usage>((u, m) => addUsage(u, memberUsage(m)), { ...ZERO_USAGE });
}

export type { StoredUsage };
export { usageFromStore };

// ---- state -----------------------------------------------------------------------------------------

/**
 * The environment's state: an operation's passing state while one sets it; else FAILED when creation
 * could not be undone; else from the members: all alike (STOPPED, RUNNING, PAUSED → SUSPENDED …), any
 * LOST or FAILED → DEGRADED, mixed → DEGRADED saying which.
 */
export function envState(e: Pick<EnvRecord, "members" | "transition" | "failed" | "stateMessage">): {
  state: EnvStateName;
  message: string;
} {
  if (e.failed) return { state: "FAILED", message: e.stateMessage };
  if (e.transition) return { state: e.transition, message: e.stateMessage };
  if (e.members.length === 0) return { state: "STOPPED", message: "" };
  const bad = e.members.filter((m) => m.state === "LOST" || m.state === "FAILED");
  if (bad.length > 0)
    return {
      state: "DEGRADED",
      message: bad
        .map((m) => `${m.id} ${m.state.toLowerCase()}${m.stateMessage ? `: ${m.stateMessage}` : ""}`)
        .join("; "),
    };
  const states = new Set(e.members.map((m) => m.state));
  if (states.size === 1) {
    const only = e.members[0]?.state;
    const map: Partial<Record<MemberStateName, EnvStateName>> = {
      STOPPED: "STOPPED",
      RUNNING: "RUNNING",
      PAUSED: "SUSPENDED",
      CREATING: "CREATING",
      PENDING: "CREATING",
      STARTING: "STARTING",
      STOPPING: "STOPPING",
      MIGRATING: "MIGRATING",
      DELETING: "DELETING",
    };
    if (only && map[only]) return { state: map[only] as EnvStateName, message: "" };
  }
  return {
    state: "DEGRADED",
    message: e.members.map((m) => `${m.id} ${m.state.toLowerCase()}`).join(", "),
  };
}

/** Members sorted by priority, stable (equal priorities keep their order). */
export function byPriority<T extends { priority: number }>(members: readonly T[]): T[] {
  return members
    .map((m, i) => ({ m, i }))
    .sort((a, b) => a.m.priority - b.m.priority || a.i - b.i)
    .map(({ m }) => m);
}
