/**
 * Deterministic names and MACs, from SHA-256 (the only I/O-free use of `node:crypto`; kept out of the
 * domain so that it imports no `node:*`).
 */
import { createHash } from "node:crypto";
import { BRIDGE_PREFIX, ifnameFromHash, macFromHash, TAP_PREFIX } from "./domain.js";

const sha = (s: string) => createHash("sha256").update(s).digest();

/** `vme-` + 11 hex digits of sha256("network/{id}"): 15 characters, 44 bits of hash. */
export const bridgeNameFor = (network: string) =>
  ifnameFromHash(BRIDGE_PREFIX, sha(`network/${network}`).toString("hex"));

/** `vmt-` + 11 hex digits of sha256("tap/{vm}/{nic}"): the same NIC always gets the same tap. */
export const tapNameFor = (vm: string, nic: string) =>
  ifnameFromHash(TAP_PREFIX, sha(`tap/${vm}/${nic}`).toString("hex"));

/** `52:54:00:` + 3 bytes of sha256("{vm}/{nic}"). */
export const macFor = (vm: string, nic: string) => macFromHash(sha(`${vm}/${nic}`));

/** A short tag of this agent's state directory, written into the alias of every link it creates. */
export const agentTagFor = (stateDir: string) => sha(`agent/${stateDir}`).toString("hex").slice(0, 12);
