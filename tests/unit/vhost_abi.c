/*
 * Prints the vhost(-vsock) ABI as seen by <linux/vhost.h>, one
 * "kind name value" per line, for tests/unit/test_vhost_vsock.py:
 *     sizeof   <struct>            <bytes>
 *     offsetof <struct>.<member>   <bytes>
 *     ioctl    <VHOST_NAME>        <number>
 * Build: gcc -o vhost_abi tests/unit/vhost_abi.c
 */
#include <stddef.h>
#include <stdio.h>
#include <linux/vhost.h>

#define SZ(s)      printf("sizeof %s %zu\n", #s, sizeof(struct s))
#define OFF(s, m)  printf("offsetof %s.%s %zu\n", #s, #m, offsetof(struct s, m))
#define IOC(n)     printf("ioctl %s %lu\n", #n, (unsigned long)(n))

int main(void)
{
	SZ(vhost_vring_state); SZ(vhost_vring_file); SZ(vhost_vring_addr);
	SZ(vhost_memory_region); SZ(vhost_memory);
	OFF(vhost_vring_state, index); OFF(vhost_vring_state, num);
	OFF(vhost_vring_file, index); OFF(vhost_vring_file, fd);
	OFF(vhost_vring_addr, index); OFF(vhost_vring_addr, flags);
	OFF(vhost_vring_addr, desc_user_addr); OFF(vhost_vring_addr, used_user_addr);
	OFF(vhost_vring_addr, avail_user_addr); OFF(vhost_vring_addr, log_guest_addr);
	OFF(vhost_memory_region, guest_phys_addr); OFF(vhost_memory_region, memory_size);
	OFF(vhost_memory_region, userspace_addr); OFF(vhost_memory_region, flags_padding);
	OFF(vhost_memory, nregions); OFF(vhost_memory, padding); OFF(vhost_memory, regions);

	IOC(VHOST_GET_FEATURES); IOC(VHOST_SET_FEATURES); IOC(VHOST_SET_OWNER);
	IOC(VHOST_RESET_OWNER); IOC(VHOST_SET_MEM_TABLE); IOC(VHOST_SET_VRING_NUM);
	IOC(VHOST_SET_VRING_ADDR); IOC(VHOST_SET_VRING_BASE); IOC(VHOST_GET_VRING_BASE);
	IOC(VHOST_SET_VRING_KICK); IOC(VHOST_SET_VRING_CALL);
	IOC(VHOST_VSOCK_SET_GUEST_CID); IOC(VHOST_VSOCK_SET_RUNNING);
	return 0;
}
