/*
 * podnet: the network namespace of a pod on the local cluster, as an LD_PRELOAD shim.
 *
 * Every pod of the local cluster runs as a plain process on this machine, and its pod IP is a
 * loopback address (127.1.N.x). Inside a real pod, binding 0.0.0.0 or 127.0.0.1 means "this
 * pod", and 127.0.0.1 reaches only the pod itself; a ClusterIP reaches a Service through
 * kube-proxy's DNAT. This shim gives unmodified programs (Python, uvloop, sh, curl) exactly
 * that, without network namespaces or root:
 *
 *   bind(0.0.0.0 | 127.0.0.1, p)       -> bind(POD_IP, p)          (also :: and ::1, v4-mapped)
 *   connect(127.0.0.1, p)              -> connect(POD_IP, p)
 *   connect(VIP, vport) listed in DNAT -> connect(target, tport)   (the kubernetes Service)
 *
 * Environment: LLMOP_POD_IP=127.1.0.7, LLMOP_POD_DNAT="10.96.0.1:443=127.0.0.1:16443,...".
 * Built by the local cluster's pod runner (llm_operator_dev.devcluster.kubelet) with gcc.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dlfcn.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define MAX_DNAT 16

struct dnat {
    struct in_addr vip;
    in_port_t vport; /* network order */
    struct in_addr target;
    in_port_t tport; /* network order */
};

static struct in_addr pod_ip;
static int have_pod_ip;
static struct dnat dnats[MAX_DNAT];
static int n_dnat;

static int (*real_bind)(int, const struct sockaddr *, socklen_t);
static int (*real_connect)(int, const struct sockaddr *, socklen_t);

static int parse_hostport(char *text, struct in_addr *addr, in_port_t *port) {
    char *colon = strrchr(text, ':');
    if (colon == NULL) return 0;
    *colon = '\0';
    if (inet_pton(AF_INET, text, addr) != 1) return 0;
    long p = strtol(colon + 1, NULL, 10);
    if (p <= 0 || p > 65535) return 0;
    *port = htons((in_port_t)p);
    return 1;
}

__attribute__((constructor)) static void podnet_init(void) {
    real_bind = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "bind");
    real_connect = (int (*)(int, const struct sockaddr *, socklen_t))dlsym(RTLD_NEXT, "connect");
    const char *ip = getenv("LLMOP_POD_IP");
    have_pod_ip = ip != NULL && inet_pton(AF_INET, ip, &pod_ip) == 1;
    const char *spec = getenv("LLMOP_POD_DNAT");
    if (spec == NULL) return;
    char *copy = strdup(spec), *save = NULL;
    for (char *rule = strtok_r(copy, ",", &save); rule && n_dnat < MAX_DNAT;
         rule = strtok_r(NULL, ",", &save)) {
        char *eq = strchr(rule, '=');
        if (eq == NULL) continue;
        *eq = '\0';
        struct dnat d;
        if (parse_hostport(rule, &d.vip, &d.vport) && parse_hostport(eq + 1, &d.target, &d.tport))
            dnats[n_dnat++] = d;
    }
    free(copy);
}

static int is_local_v4(struct in_addr a) {
    return a.s_addr == htonl(INADDR_ANY) || a.s_addr == htonl(INADDR_LOOPBACK);
}

static int is_local_v6(const struct in6_addr *a) {
    return IN6_IS_ADDR_UNSPECIFIED(a) || IN6_IS_ADDR_LOOPBACK(a) ||
           (IN6_IS_ADDR_V4MAPPED(a) && is_local_v4(*(const struct in_addr *)&a->s6_addr[12]));
}

static void to_mapped(struct in6_addr *out, struct in_addr v4) {
    memset(out, 0, sizeof *out);
    out->s6_addr[10] = 0xff;
    out->s6_addr[11] = 0xff;
    memcpy(&out->s6_addr[12], &v4, 4);
}

int bind(int fd, const struct sockaddr *addr, socklen_t len) {
    if (have_pod_ip && addr != NULL) {
        if (addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
            struct sockaddr_in in = *(const struct sockaddr_in *)addr;
            if (is_local_v4(in.sin_addr)) {
                in.sin_addr = pod_ip;
                return real_bind(fd, (struct sockaddr *)&in, sizeof in);
            }
        } else if (addr->sa_family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
            struct sockaddr_in6 in6 = *(const struct sockaddr_in6 *)addr;
            if (is_local_v6(&in6.sin6_addr)) {
                /* The pod has one (IPv4) address: a dual-stack socket bound to it. */
                int off = 0;
                setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &off, sizeof off);
                to_mapped(&in6.sin6_addr, pod_ip);
                return real_bind(fd, (struct sockaddr *)&in6, sizeof in6);
            }
        }
    }
    return real_bind(fd, addr, len);
}

int connect(int fd, const struct sockaddr *addr, socklen_t len) {
    if (addr != NULL && addr->sa_family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in = *(const struct sockaddr_in *)addr;
        for (int i = 0; i < n_dnat; i++) {
            if (in.sin_addr.s_addr == dnats[i].vip.s_addr && in.sin_port == dnats[i].vport) {
                in.sin_addr = dnats[i].target;
                in.sin_port = dnats[i].tport;
                return real_connect(fd, (struct sockaddr *)&in, sizeof in);
            }
        }
        if (have_pod_ip && in.sin_addr.s_addr == htonl(INADDR_LOOPBACK)) {
            in.sin_addr = pod_ip;
            return real_connect(fd, (struct sockaddr *)&in, sizeof in);
        }
    } else if (have_pod_ip && addr != NULL && addr->sa_family == AF_INET6 &&
               len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in6 = *(const struct sockaddr_in6 *)addr;
        if (IN6_IS_ADDR_LOOPBACK(&in6.sin6_addr)) {
            to_mapped(&in6.sin6_addr, pod_ip);
            return real_connect(fd, (struct sockaddr *)&in6, sizeof in6);
        }
    }
    return real_connect(fd, addr, len);
}
