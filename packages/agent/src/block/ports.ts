/**
 * What the VM side needs of block storage, and what block storage needs of the VM side. Both are small
 * ports so that neither imports the other's internals.
 */

/** A volume as a VMM opens it. */
export interface VolumeFile {
  /** `volumes/{volume}`. */
  name: string;
  /** Absolute path of the image file. */
  path: string;
  format: "raw" | "qcow2";
  sizeBytes: bigint;
  /**
   * Set when a storage daemon serves the volume (backend VHOST_USER_BLK or NBD): the VMM connects to
   * this socket instead of opening `path`. Unset: the VMM opens the file itself.
   */
  export?: VolumeExport;
}

/** How a VMM reaches a volume that a qemu-storage-daemon exports. */
export type VolumeExport =
  | { kind: "vhost-user-blk"; socket: string }
  | { kind: "nbd"; socket: string; exportName: string };

/** Resolves volume names for VM disks (implemented by the block service). */
export interface VolumeResolver {
  /** The file behind `volumes/{id}`; NOT_FOUND (reason VOLUME_NOT_FOUND, metadata volume) when there is none. */
  resolve(volumeName: string): Promise<VolumeFile>;
  /**
   * The volume as one VM is about to attach it, with its backend made ready (a storage daemon started
   * or re-used for VHOST_USER_BLK and NBD volumes). Refused (FAILED_PRECONDITION) when the backend
   * cannot serve this attachment, e.g. a vhost-user-blk export another running VM holds.
   */
  open?(volumeName: string, user: { vm: string; readOnly: boolean }): Promise<VolumeFile>;
}

/** Answers "which VMs use this volume?" (implemented by the VM side, from the VMs' devices; seed 002). */
export type VolumeUsers = (volumeName: string) => string[];

/**
 * Grows a volume in the VMMs that have it open as a file (QMP `block_resize` on the disk's node), so
 * that their guests see the new size; answers the VMs it reached (implemented by the VM side).
 */
export type LiveVolumeResize = (volumeName: string, sizeBytes: bigint) => Promise<string[]>;
