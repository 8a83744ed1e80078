import { create } from "@bufbuild/protobuf";
import { timestampFromMs } from "@bufbuild/protobuf/wkt";
import { NetworkSchema, PortSchema } from "@vmenv/api/agent/v1";
import { InvalidArgumentError } from "commander";
import { describe, expect, it } from "vitest";
import { networkDetail, networkFlags, networkName, networkTable, parseMtu, portTable } from "./network.js";

const local = create(NetworkSchema, {
  name: "networks/lan",
  bridgeName: "vme-0123456789a",
  cidr: "10.20.0.0/24",
  gateway: "10.20.0.1",
  portCount: 2,
  createTime: timestampFromMs(Date.UTC(2026, 0, 31, 12)),
});
const shared = create(NetworkSchema, {
  name: "networks/dmz",
  bridgeName: "br-dmz",
  cidr: "192.168.7.0/24",
  gateway: "192.168.7.254",
  uplink: "eth1.20",
  mtu: 9000,
  isolatePorts: true,
  allowedPeers: ["networks/lan", "networks/ops"],
  labels: { tenant: "acme" },
});

describe("network output", () => {
  it("takes a network as lan or networks/lan", () => {
    expect(networkName("lan")).toBe("networks/lan");
    expect(networkName("networks/lan")).toBe("networks/lan");
  });

  it("lists networks with '-' for no uplink and no flags, 1500 for the default MTU", () => {
    expect(networkFlags(local)).toBe("-");
    expect(networkFlags(shared)).toBe("isolate-ports peers=lan,ops");
    expect(networkTable([shared, local]).split("\n")).toEqual([
      "NETWORK  BRIDGE           CIDR            GATEWAY        UPLINK   MTU   PORTS  FLAGS",
      "dmz      br-dmz           192.168.7.0/24  192.168.7.254  eth1.20  9000  0      isolate-ports peers=lan,ops",
      "lan      vme-0123456789a  10.20.0.0/24    10.20.0.1      -        1500  2      -",
    ]);
  });

  it("details every field, saying where the gateway is", () => {
    expect(networkDetail(local)).toMatch(/^Gateway:\s+10\.20\.0\.1 \(on the host's bridge\)$/m);
    expect(networkDetail(local)).toMatch(/^Uplink:\s+none \(local to this host\)$/m);
    expect(networkDetail(local)).toMatch(/^Created:\s+2026-01-31T12:00:00\.000Z$/m);
    const d = networkDetail(shared);
    expect(d).toMatch(/^Gateway:\s+192\.168\.7\.254 \(the segment's router\)$/m);
    expect(d).toMatch(/^Allowed peers:\s+networks\/lan, networks\/ops$/m);
    expect(d).toMatch(/^Labels:\s+tenant=acme$/m);
    expect(d).toMatch(/^Created:\s+-$/m);
  });

  it("lists ports by network and port id, the VM without its prefix", () => {
    const p = create(PortSchema, {
      name: "networks/lan/ports/web-1-eth0",
      tapName: "vmt-0123456789a",
      macAddress: "52:54:00:12:34:56",
      ipAddress: "10.20.0.2",
      vm: "vms/web-1",
      nicId: "eth0",
      active: true,
    });
    expect(portTable([p]).split("\n")).toEqual([
      "NETWORK  PORT        VM     NIC   TAP              MAC                ADDRESS    ACTIVE",
      "lan      web-1-eth0  web-1  eth0  vmt-0123456789a  52:54:00:12:34:56  10.20.0.2  yes",
    ]);
    expect(portTable([])).toBe("NETWORK  PORT  VM  NIC  TAP  MAC  ADDRESS  ACTIVE");
  });

  it("takes --mtu as a whole number and leaves its range to the agent", () => {
    expect(parseMtu("9000")).toBe(9000);
    expect(parseMtu("0")).toBe(0);
    for (const bad of ["abc", "", "1.5", "-1", "1e3", "99999999999"])
      expect(() => parseMtu(bad)).toThrow(InvalidArgumentError);
  });
});
