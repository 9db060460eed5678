/*
 * vecstate: does the kernel keep this process's registers across task
 * switches?  Installed in the stratopy guest rootfs as /usr/bin/vecstate.
 *
 * Usage: vecstate [-x] [SECONDS]
 *
 * Until SECONDS (default 5) have passed, it loads a pattern that names this
 * process (pid) and the iteration into the general registers, XMM0-15 and,
 * when the CPU and XCR0 allow it, the upper halves of YMM0-15, the upper
 * 256 bits of ZMM0-15, ZMM16-31 and k1-k7; calls sched_yield(); and
 * compares every register with what it loaded.  Load, system call and
 * store are one asm block, and the program is built with
 * -mgeneral-regs-only, so no compiler-generated code touches a vector
 * register in between.  Run two at once: each yield then switches to the
 * sibling, which loads its own pattern.
 *
 * One line on stdout, e.g.
 *   vecstate pid=57 level=avx512 xcr0=0xe7 yields=2410 gpr=0 xmm=0
 *            ymm_upper=1200 zmm_upper=1200 zmm16_31=1200 kmask=1200 foreign=1200
 * Each class counts the yields after which at least one of its registers
 * differed ("na": the CPU or the OS does not enable it); foreign counts the
 * yields after which a register held another process's pattern.
 * Exit status: 0 every register intact, 2 only AVX/AVX-512 state (YMM upper,
 * ZMM, k) differed, 1 general or XMM registers differed (what every program
 * relies on), 3 usage.
 *
 * The CPU and XCR0 decide which registers are used, after CPUID says the OS
 * enabled XSAVE (OSXSAVE), as glibc, Go and OpenSSL check it.  -x skips
 * that check and asks XCR0 directly (a program that does not check): on a
 * kvm_pvm host whose CPUID reports OSXSAVE=0 for a `noxsave` guest, user
 * code still runs with the host's XCR0, and -x shows what that state is
 * worth.  Without hardware OSXSAVE, -x dies by SIGILL on XGETBV.
 *
 * Freestanding (no libc: raw system calls), so it runs on any x86-64 Linux
 * and its own start-up uses no vector code either.
 */

typedef unsigned long u64;
typedef unsigned int u32;

#define SYS_write 1
#define SYS_sched_yield 24
#define SYS_exit_group 231
#define SYS_getpid 39
#define SYS_clock_gettime 228

static long sys3(long n, long a, long b, long c)
{
	long r;
	__asm__ volatile("syscall" : "=a"(r) : "0"(n), "D"(a), "S"(b), "d"(c)
			 : "rcx", "r11", "memory");
	return r;
}

/* Register images (pattern in, values out), named from the asm. */
#define NGPR 11                      /* rbx rdx rsi rdi r8 r9 r10 r12-r15 */
u64 vs_fill_gpr[NGPR], vs_got_gpr[NGPR];
u64 vs_fill_vec[32 * 8] __attribute__((aligned(64)));   /* zmm0-31, 8 qwords each */
u64 vs_got_vec[32 * 8] __attribute__((aligned(64)));
u64 vs_fill_k[8], vs_got_k[8];                          /* k1-k7 at [1..7] */

#define GPR_LOAD \
	"mov vs_fill_gpr+0(%%rip), %%rbx\n\t"  "mov vs_fill_gpr+8(%%rip), %%rdx\n\t" \
	"mov vs_fill_gpr+16(%%rip), %%rsi\n\t" "mov vs_fill_gpr+24(%%rip), %%rdi\n\t" \
	"mov vs_fill_gpr+32(%%rip), %%r8\n\t"  "mov vs_fill_gpr+40(%%rip), %%r9\n\t" \
	"mov vs_fill_gpr+48(%%rip), %%r10\n\t" "mov vs_fill_gpr+56(%%rip), %%r12\n\t" \
	"mov vs_fill_gpr+64(%%rip), %%r13\n\t" "mov vs_fill_gpr+72(%%rip), %%r14\n\t" \
	"mov vs_fill_gpr+80(%%rip), %%r15\n\t"
#define GPR_STORE \
	"mov %%rbx, vs_got_gpr+0(%%rip)\n\t"  "mov %%rdx, vs_got_gpr+8(%%rip)\n\t" \
	"mov %%rsi, vs_got_gpr+16(%%rip)\n\t" "mov %%rdi, vs_got_gpr+24(%%rip)\n\t" \
	"mov %%r8, vs_got_gpr+32(%%rip)\n\t"  "mov %%r9, vs_got_gpr+40(%%rip)\n\t" \
	"mov %%r10, vs_got_gpr+48(%%rip)\n\t" "mov %%r12, vs_got_gpr+56(%%rip)\n\t" \
	"mov %%r13, vs_got_gpr+64(%%rip)\n\t" "mov %%r14, vs_got_gpr+72(%%rip)\n\t" \
	"mov %%r15, vs_got_gpr+80(%%rip)\n\t"
#define YIELD "mov $24, %%eax\n\tsyscall\n\t"
#define CLOBBERS "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", \
	"r11", "r12", "r13", "r14", "r15", "memory"

#define R16(m) m(0) m(1) m(2) m(3) m(4) m(5) m(6) m(7) \
	m(8) m(9) m(10) m(11) m(12) m(13) m(14) m(15)
#define R32(m) R16(m) m(16) m(17) m(18) m(19) m(20) m(21) m(22) m(23) \
	m(24) m(25) m(26) m(27) m(28) m(29) m(30) m(31)
#define K7(m) m(1) m(2) m(3) m(4) m(5) m(6) m(7)

#define LD_X(n) "movdqu vs_fill_vec+" #n "*64(%%rip), %%xmm" #n "\n\t"
#define ST_X(n) "movdqu %%xmm" #n ", vs_got_vec+" #n "*64(%%rip)\n\t"
#define LD_Y(n) "vmovdqu vs_fill_vec+" #n "*64(%%rip), %%ymm" #n "\n\t"
#define ST_Y(n) "vmovdqu %%ymm" #n ", vs_got_vec+" #n "*64(%%rip)\n\t"
#define LD_Z(n) "vmovdqu64 vs_fill_vec+" #n "*64(%%rip), %%zmm" #n "\n\t"
#define ST_Z(n) "vmovdqu64 %%zmm" #n ", vs_got_vec+" #n "*64(%%rip)\n\t"
#define LD_K(n) "kmovq vs_fill_k+" #n "*8(%%rip), %%k" #n "\n\t"
#define ST_K(n) "kmovq %%k" #n ", vs_got_k+" #n "*8(%%rip)\n\t"

enum level { SSE, AVX, AVX512 };
static const char *const level_name[] = { "sse", "avx", "avx512" };

static void yield_checked(enum level lv)
{
	if (lv == AVX512)
		__asm__ volatile(GPR_LOAD R32(LD_Z) K7(LD_K) YIELD GPR_STORE R32(ST_Z) K7(ST_K)
				 ::: CLOBBERS);
	else if (lv == AVX)
		__asm__ volatile(GPR_LOAD R16(LD_Y) YIELD GPR_STORE R16(ST_Y) ::: CLOBBERS);
	else
		__asm__ volatile(GPR_LOAD R16(LD_X) YIELD GPR_STORE R16(ST_X) ::: CLOBBERS);
}

static void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "0"(leaf), "2"(sub));
}

/* What this process may use: the CPU's bits, and XCR0 (the OS's consent). */
static u32 cpuid1_ecx, cpuid7_ebx;

static enum level probe(u64 *xcr0, int skip_osxsave_check)
{
	u32 r[4], lo, hi;
	*xcr0 = 0;
	cpuid(0, 0, r);
	u32 max = r[0];
	if (max >= 7) {
		cpuid(7, 0, r);
		cpuid7_ebx = r[1];
	}
	cpuid(1, 0, r);
	cpuid1_ecx = r[2];
	if (!(r[2] & (1u << 27)) && !skip_osxsave_check)   /* OSXSAVE: may XGETBV */
		return SSE;
	int avx = r[2] >> 28 & 1;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
	*xcr0 = (u64)hi << 32 | lo;
	int avx512f = cpuid7_ebx >> 16 & 1;
	if (avx512f && (*xcr0 & 0xe6) == 0xe6)
		return AVX512;
	if (avx && (*xcr0 & 0x6) == 0x6)
		return AVX;
	return SSE;
}

/* Pattern qword: magic, process tag, iteration, position. */
#define MAGIC 0x5ec5ul
static u64 pattern(u64 tag, u64 iter, u64 pos)
{
	return MAGIC << 48 | (tag & 0xffff) << 32 | (iter & 0xffff) << 16 | (pos & 0xffff);
}

static int foreign(u64 v, u64 tag)
{
	return v >> 48 == MAGIC && (v >> 32 & 0xffff) != (tag & 0xffff);
}

enum cls { C_GPR, C_XMM, C_YMM_UPPER, C_ZMM_UPPER, C_ZMM16_31, C_KMASK, NCLS };
static const char *const cls_name[] = {
	"gpr", "xmm", "ymm_upper", "zmm_upper", "zmm16_31", "kmask"
};

/* Class of qword q (0-7) of vector register r at this level, or -1: not loaded. */
static int vec_class(enum level lv, int r, int q)
{
	if (r >= 16)
		return lv == AVX512 ? C_ZMM16_31 : -1;
	if (q < 2)
		return C_XMM;
	if (q < 4)
		return lv >= AVX ? C_YMM_UPPER : -1;
	return lv == AVX512 ? C_ZMM_UPPER : -1;
}

static char out[512];
static int outlen;

static void put(const char *s)
{
	while (*s && outlen < (int)sizeof(out) - 1)
		out[outlen++] = *s++;
}

static void put_u(u64 v, int base)
{
	char b[24];
	int i = 0;
	do {
		b[i++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	while (i && outlen < (int)sizeof(out) - 1)
		out[outlen++] = b[--i];
}

static u64 now_ns(void)
{
	struct { long s, ns; } ts;
	sys3(SYS_clock_gettime, 1 /* CLOCK_MONOTONIC */, (long)&ts, 0);
	return (u64)ts.s * 1000000000ul + (u64)ts.ns;
}

static int run(int argc, char **argv)
{
	u64 seconds = 5;
	int skip_osxsave_check = 0;
	if (argc > 1 && argv[1][0] == '-' && argv[1][1] == 'x' && !argv[1][2]) {
		skip_osxsave_check = 1;
		argc--;
		argv++;
	}
	if (argc > 2)
		return 3;
	if (argc == 2) {
		seconds = 0;
		if (!*argv[1])
			return 3;
		for (const char *p = argv[1]; *p; p++) {
			if (*p < '0' || *p > '9' || seconds > 3600)
				return 3;
			seconds = seconds * 10 + (u64)(*p - '0');
		}
	}
	u64 xcr0;
	enum level lv = probe(&xcr0, skip_osxsave_check);
	u64 tag = (u64)sys3(SYS_getpid, 0, 0, 0);
	u64 bad[NCLS] = { 0 }, nforeign = 0, yields = 0;
	u64 end = now_ns() + seconds * 1000000000ul;

	do {
		u64 it = yields;
		for (int i = 0; i < NGPR; i++)
			vs_fill_gpr[i] = pattern(tag, it, i);
		for (int i = 0; i < 32 * 8; i++)
			vs_fill_vec[i] = pattern(tag, it, 0x100 + i);
		for (int i = 1; i < 8; i++)
			vs_fill_k[i] = pattern(tag, it, 0x200 + i);
		yield_checked(lv);
		yields++;

		int hit[NCLS] = { 0 }, alien = 0;
		for (int i = 0; i < NGPR; i++)
			if (vs_got_gpr[i] != vs_fill_gpr[i]) {
				hit[C_GPR] = 1;
				alien |= foreign(vs_got_gpr[i], tag);
			}
		for (int i = 0; i < 32 * 8; i++) {
			int c = vec_class(lv, i / 8, i % 8);
			if (c >= 0 && vs_got_vec[i] != vs_fill_vec[i]) {
				hit[c] = 1;
				alien |= foreign(vs_got_vec[i], tag);
			}
		}
		for (int i = 1; lv == AVX512 && i < 8; i++)
			if (vs_got_k[i] != vs_fill_k[i]) {
				hit[C_KMASK] = 1;
				alien |= foreign(vs_got_k[i], tag);
			}
		for (int c = 0; c < NCLS; c++)
			bad[c] += hit[c];
		nforeign += alien;
	} while (now_ns() < end);

	put("vecstate pid=");
	put_u(tag, 10);
	put(" level=");
	put(level_name[lv]);
	put(" cpuid1.ecx=0x");
	put_u(cpuid1_ecx, 16);
	put(" cpuid7.ebx=0x");
	put_u(cpuid7_ebx, 16);
	put(" xcr0=0x");
	put_u(xcr0, 16);
	put(" yields=");
	put_u(yields, 10);
	for (int c = 0; c < NCLS; c++) {
		put(" ");
		put(cls_name[c]);
		put("=");
		int avail = c <= C_XMM || (c == C_YMM_UPPER && lv >= AVX) || lv == AVX512;
		if (avail)
			put_u(bad[c], 10);
		else
			put("na");
	}
	put(" foreign=");
	put_u(nforeign, 10);
	put("\n");
	sys3(SYS_write, 1, (long)out, outlen);
	if (bad[C_GPR] || bad[C_XMM])
		return 1;
	for (int c = C_YMM_UPPER; c < NCLS; c++)
		if (bad[c])
			return 2;
	return 0;
}

static const char usage[] = "usage: vecstate [-x] [SECONDS]\n";

/* The kernel enters at _start with rsp -> argc, argv[0], ..., NULL. */
__attribute__((used)) static void start_c(long *sp)
{
	int argc = (int)sp[0];
	int rc = run(argc, (char **)(sp + 1));
	if (rc == 3)
		sys3(SYS_write, 2, (long)usage, sizeof(usage) - 1);
	sys3(SYS_exit_group, rc, 0, 0);
	for (;;)
		;
}

__asm__(".text\n.globl _start\n_start:\n\txor %ebp, %ebp\n\tmov %rsp, %rdi\n"
	"\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
