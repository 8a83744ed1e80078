/**
 * What the VM side needs of networking: a port (a tap on the network's bridge) per NIC. A small port so
 * that the VM side does not import the network internals.
 */

/** A NIC's attachment, as the VMM needs it and as the guest is told (command line or DHCP). */
export interface NicAttachment {
  /** `networks/{network}/ports/{port}`. */
  port: string;
  /** The tap device the VMM opens. */
  tap: string;
  /** The NIC's MAC, lower case. */
  mac: string;
  /** The guest's IPv4 address. */
  ip: string;
  /** Prefix length of the network. */
  prefix: number;
  /** The host's address on the bridge, the guest's default gateway. */
  gateway?: string;
  /** MTU of the bridge and tap. */
  mtu: number;
}

/** Implemented by the network service. Both calls are idempotent. */
export interface NicBackend {
  /**
   * Creates (or finds again) the port of NIC `nic` of `vm` on `network` (`networks/{n}` or `{n}`; `vm`
   * as `vms/{vm}` or `{vm}`): the tap exists, is on the bridge and up; the MAC and IP are the ones
   * wanted, or derived (MAC) and allocated (IP). Repeating the call returns the same attachment; asking
   * for another MAC or IP than the port has fails with ALREADY_EXISTS.
   */
  allocate(
    network: string,
    vm: string,
    nic: string,
    want: { mac?: string; ip?: string },
  ): Promise<NicAttachment>;
  /** Removes the tap and frees the address; a port that does not exist is a no-op. */
  release(network: string, vm: string, nic: string): Promise<void>;
}
