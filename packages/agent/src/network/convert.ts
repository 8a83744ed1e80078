import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { type Network, NetworkSchema, type Port, PortSchema } from "@vmenv/api/agent/v1";
import type { NetworkRequest, NetworkView, PortView } from "./manager.js";

/** The API's Network (from CreateNetwork) → what the manager is asked for. */
export function fromPbNetwork(n: Network): NetworkRequest {
  return {
    bridge: n.bridgeName,
    cidr: n.cidr,
    gateway: n.gateway,
    vlanId: n.vlanId,
    uplink: n.uplink,
    masquerade: n.masquerade,
    isolatePorts: n.isolatePorts,
    allowedPeers: [...n.allowedPeers],
    mtu: n.mtu,
    labels: { ...n.labels },
  };
}

export function toPbNetwork(v: NetworkView): Network {
  const r = v.record;
  return create(NetworkSchema, {
    name: `networks/${r.id}`,
    bridgeName: r.bridge,
    cidr: r.cidr,
    gateway: r.gateway,
    vlanId: r.vlanId,
    uplink: r.uplink,
    masquerade: r.masquerade,
    isolatePorts: r.isolatePorts,
    allowedPeers: r.allowedPeers,
    mtu: r.mtu,
    labels: r.labels,
    portCount: v.portCount,
    createTime: timestampFromMs(r.createTimeMs),
  });
}

export function toPbPort(v: PortView): Port {
  const p = v.record;
  return create(PortSchema, {
    name: `networks/${p.network}/ports/${p.id}`,
    tapName: p.tap,
    macAddress: p.mac,
    ipAddress: p.ip,
    vm: `vms/${p.vm}`,
    nicId: p.nic,
    active: v.active,
    createTime: timestampFromMs(p.createTimeMs),
  });
}
