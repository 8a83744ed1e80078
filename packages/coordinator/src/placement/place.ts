/**
 * Placement: which agent a member (one VM of an environment) goes to. Pure: candidates and request in,
 * a choice or a refusal out; no I/O, no clock.
 *
 * Filters (a candidate failing one is out, with the first reason it failed): the pinned agent, state
 * READY, labels (the member's and its tree node policy's), networks present, free capacity (vCPUs,
 * memory, GPUs, GPU memory: need ≤ capacity − allocated), hard affinity and anti-affinity against the
 * members already placed. Score of the candidates left: bin-packing (prefer the fullest agent that
 * fits, the default) or spread (prefer the emptiest), plus or minus soft rules; ties go to the smaller
 * agent id, so the same input always gives the same answer.
 */
import { VmenvError } from "@vmenv/rpc/errors";
import { addUsage, type Usage } from "../domain/usage.js";
import type { AgentCapacity, AgentStateName } from "../fleet/types.js";

/**
 * An affinity rule of an environment (Nova's server groups, per role or member). A rule applies to the
 * members it selects: by id (`memberIds`) or by role (`roles`); selecting by role never makes a member
 * its own peer.
 */
export interface AffinityRuleSpec {
  /** "affinity": the selected members share an agent; "anti-affinity": no two share one. */
  type: "affinity" | "anti-affinity";
  /** "hard": a filter (no fit → refusal); "soft": a score term (× weight per peer concerned). */
  enforcement: "hard" | "soft";
  memberIds: string[];
  roles: string[];
  /** Weight of a soft rule; ≤ 0 counts as 1. One unit outweighs the whole resource score (0–100). */
  weight: number;
}

/** An agent as placement sees it. */
export interface PlacementCandidate {
  id: string;
  state: AgentStateName;
  labels: Record<string, string>;
  capacity: AgentCapacity;
  /** What the coordinator placed there already (claims included). */
  allocated: Usage;
  /** Networks present on the agent, "networks/x". */
  networks: string[];
}

/** One member to place. */
export interface PlacementRequest {
  memberId: string;
  role: string;
  need: Usage;
  /** Pinned agent id: only that one is considered. */
  agent?: string;
  /** Labels the member asks of its agent. */
  agentLabels: Record<string, string>;
  /** Labels the member's tree node policy asks of its agent. */
  requiredLabels: Record<string, string>;
  /** Networks the member's NICs join, "networks/x". */
  networks: string[];
  rules: AffinityRuleSpec[];
  /** Members of the environment already placed. */
  peers: Array<{ memberId: string; role: string; agent: string }>;
  strategy: "binpack" | "spread";
}

/** The chosen agent, its score, and every fitting agent ranked (best first). */
export interface PlacementChoice {
  agent: string;
  score: number;
  ranked: Array<{ agent: string; score: number }>;
}

/** Soft rule weight unit: one unit of weight is worth a whole resource score range. */
const SOFT_UNIT = 100;

/**
 * Chooses an agent for one member. Throws VmenvError NO_AGENT_FITS (metadata `member`) naming, for
 * every agent, why it was refused: RESOURCE_EXHAUSTED when every agent was refused for room only,
 * FAILED_PRECONDITION otherwise.
 */
export function place(req: PlacementRequest, candidates: PlacementCandidate[]): PlacementChoice {
  const pool = req.agent ? candidates.filter((c) => c.id === req.agent) : candidates;
  const refusals: Array<{ agent: string; why: string; room: boolean }> = [];
  const ranked: Array<{ agent: string; score: number }> = [];
  if (req.agent && pool.length === 0) {
    refusals.push({ agent: req.agent, why: "pinned, but not in the fleet", room: false });
  }
  for (const c of [...pool].sort((a, b) => cmp(a.id, b.id))) {
    const refusal = filter(req, c);
    if (refusal) refusals.push({ agent: c.id, ...refusal });
    else ranked.push({ agent: c.id, score: score(req, c) });
  }
  ranked.sort((a, b) => b.score - a.score || cmp(a.agent, b.agent));
  const best = ranked[0];
  if (best) return { agent: best.agent, score: best.score, ranked };
  const roomOnly = refusals.length > 0 && refusals.every((r) => r.room);
  const list = refusals.length > 0 ? refusals.map((r) => `${r.agent}: ${r.why}`).join("; ") : "no agents";
  throw new VmenvError(
    roomOnly ? "resource-exhausted" : "failed-precondition",
    `no agent fits member ${req.memberId}: ${list}`,
    { reason: "NO_AGENT_FITS", metadata: { member: req.memberId } },
  );
}

/**
 * Places members in order, each seeing the room the previous ones took and them as peers (so a group
 * with anti-affinity spreads as it should). Candidates are not modified. Throws on the first member
 * that fits nowhere; nothing of the group is then placed.
 */
export function placeAll(requests: PlacementRequest[], candidates: PlacementCandidate[]): PlacementChoice[] {
  const pool = candidates.map((c) => ({ ...c, allocated: { ...c.allocated } }));
  const placed: Array<{ memberId: string; role: string; agent: string }> = [];
  const out: PlacementChoice[] = [];
  for (const req of requests) {
    const choice = place({ ...req, peers: [...req.peers, ...placed] }, pool);
    const c = pool.find((p) => p.id === choice.agent);
    if (c) c.allocated = addUsage(c.allocated, req.need);
    placed.push({ memberId: req.memberId, role: req.role, agent: choice.agent });
    out.push(choice);
  }
  return out;
}

// ---- filters ------------------------------------------------------------------------------------

function filter(req: PlacementRequest, c: PlacementCandidate): { why: string; room: boolean } | undefined {
  if (c.state !== "ready") return { why: c.state, room: false };
  for (const [labels, whose] of [
    [req.agentLabels, "the member"],
    [req.requiredLabels, "the node policy"],
  ] as const) {
    for (const [k, v] of Object.entries(labels)) {
      const has = c.labels[k];
      if (has !== v) {
        const now = has === undefined ? "absent" : `has ${k}=${has}`;
        return { why: `label ${k}=${v} required by ${whose} (${now})`, room: false };
      }
    }
  }
  const missing = req.networks.filter((n) => !c.networks.includes(n));
  if (missing.length > 0) return { why: `${missing.join(", ")} not present`, room: false };
  const room = roomRefusal(req.need, c);
  if (room) return { why: room, room: true };
  for (const rule of req.rules) {
    if (rule.enforcement !== "hard" || !applies(rule, req)) continue;
    const peers = selectedPeers(rule, req);
    if (rule.type === "anti-affinity") {
      const clash = peers.find((p) => p.agent === c.id);
      if (clash) return { why: `anti-affinity with ${clash.memberId}${via(rule, clash)}`, room: false };
    } else {
      const away = peers.find((p) => p.agent !== c.id);
      if (away)
        return { why: `affinity with ${away.memberId}${via(rule, away)} on ${away.agent}`, room: false };
    }
  }
  return undefined;
}

function roomRefusal(need: Usage, c: PlacementCandidate): string | undefined {
  const a = c.allocated;
  const cap = c.capacity;
  const freeVcpus = Math.max(0, cap.vcpus - a.vcpus);
  if (need.vcpus > freeVcpus) return `${freeVcpus} vCPUs free, ${need.vcpus} needed`;
  const freeMem = cap.memoryBytes > a.memoryBytes ? cap.memoryBytes - a.memoryBytes : 0n;
  if (need.memoryBytes > freeMem) return `${bytes(freeMem)} memory free, ${bytes(need.memoryBytes)} needed`;
  const freeGpus = Math.max(0, cap.gpus - a.gpus);
  if (need.gpus > freeGpus) return `${freeGpus} GPUs free, ${need.gpus} needed`;
  const freeGpuMem = cap.gpuMemoryBytes > a.gpuMemoryBytes ? cap.gpuMemoryBytes - a.gpuMemoryBytes : 0n;
  if (need.gpuMemoryBytes > freeGpuMem)
    return `${bytes(freeGpuMem)} GPU memory free, ${bytes(need.gpuMemoryBytes)} needed`;
  return undefined;
}

/** Whether a rule concerns the member being placed. */
function applies(rule: AffinityRuleSpec, req: PlacementRequest): boolean {
  return rule.memberIds.includes(req.memberId) || rule.roles.includes(req.role);
}

/** The placed peers a rule selects, never the member itself. */
function selectedPeers(rule: AffinityRuleSpec, req: PlacementRequest): PlacementRequest["peers"] {
  return req.peers.filter(
    (p) =>
      p.memberId !== req.memberId && (rule.memberIds.includes(p.memberId) || rule.roles.includes(p.role)),
  );
}

function via(rule: AffinityRuleSpec, peer: { memberId: string; role: string }): string {
  return rule.memberIds.includes(peer.memberId) ? "" : ` (role ${peer.role})`;
}

// ---- score --------------------------------------------------------------------------------------

/**
 * How full an agent is with `used` placed on it: used/capacity for each resource it offers (undefined
 * for one it has none of). Placement scores by their mean; the rebalancer's load is the largest of
 * vCPUs and memory (fleet/rebalance.ts).
 */
export function fullness(
  used: Usage,
  capacity: AgentCapacity,
): { vcpus?: number; memory?: number; gpus?: number; gpuMemory?: number } {
  return {
    ...(capacity.vcpus > 0 ? { vcpus: used.vcpus / capacity.vcpus } : {}),
    ...(capacity.memoryBytes > 0n ? { memory: ratio(used.memoryBytes, capacity.memoryBytes) } : {}),
    ...(capacity.gpus > 0 ? { gpus: used.gpus / capacity.gpus } : {}),
    ...(capacity.gpuMemoryBytes > 0n
      ? { gpuMemory: ratio(used.gpuMemoryBytes, capacity.gpuMemoryBytes) }
      : {}),
  };
}

function score(req: PlacementRequest, c: PlacementCandidate): number {
  const ratios = Object.values(fullness(addUsage(c.allocated, req.need), c.capacity));
  const full = ratios.length > 0 ? ratios.reduce((s, r) => s + r, 0) / ratios.length : 0;
  let s = req.strategy === "spread" ? (1 - full) * 100 : full * 100;
  for (const rule of req.rules) {
    if (rule.enforcement !== "soft" || !applies(rule, req)) continue;
    const here = selectedPeers(rule, req).filter((p) => p.agent === c.id).length;
    const w = (rule.weight > 0 ? rule.weight : 1) * SOFT_UNIT * here;
    s += rule.type === "affinity" ? w : -w;
  }
  // Rounded so that float noise never decides between two agents (ties go by id).
  return Math.round(s * 1e6) / 1e6;
}

function ratio(a: bigint, b: bigint): number {
  return Number((a * 1_000_000n) / b) / 1_000_000;
}

function cmp(a: string, b: string): number {
  return a < b ? -1 : a > b ? 1 : 0;
}

/** Bytes in words: "512 MiB", "2 GiB", "1.5 GiB". */
export function bytes(n: bigint): string {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let v = Number(n);
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  const text = Number.isInteger(v) ? String(v) : v.toFixed(1).replace(/\.0$/, "");
  return `${text} ${units[i]}`;
}
