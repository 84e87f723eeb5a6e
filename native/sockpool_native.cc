// sockpool's native addon: Linux socket syscalls and libuv readiness, nothing else.
//
// Each export wraps one or two syscalls. A syscall failure throws an Error shaped like Node's own
// ({ errno: -111, code: 'ECONNREFUSED', syscall: 'connect', message: 'connect ECONNREFUSED 127.0.0.1:9' });
// failures of our own carry a SOCKPOOL_ERR_* code. Policy (what to connect to, when to close, what a message
// means) lives in TypeScript: shared/native.ts is the typed wrapper.
//
// Threads. The addon is context-aware: it loads into the main thread and into any number of worker threads, and
// every piece of mutable state belongs to one Node environment (one thread):
//   - SockpoolAddon, the environment's instance data: the fds this environment received and still owns
//     ("tracked"), and the set of fds its Pollers watch;
//   - each Poller: its uv_poll_t, on that environment's libuv loop.
// Threads share the process's fd table, and a worker thread that ends does not close anything it held. So when an
// environment is torn down (worker.terminate(), a crash, normal exit), its Pollers are closed by an async cleanup
// hook and its tracked fds are closed by the instance-data finalizer.
//
// Fd ownership. Every function that creates an fd (socket, accept, recvmsg) hands it to the caller, who must
// close it (close() below) or pass ownership on. Fds received with recvMessage are also tracked for the current
// environment until close() or untrack(). Sending an fd (sendMessage, sendDatagram) never closes the caller's copy.
// All fds created here are O_CLOEXEC and non-blocking unless a comment says otherwise.

#include <napi.h>
#include <uv.h>

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#ifndef TCP_ULP
#define TCP_ULP 31  // linux/tcp.h; older C libraries lack it
#endif
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/sockios.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <functional>
#include <cmath>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <unordered_map>
#include <unordered_set>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kMaxFdsPerMessage = 253;  // the kernel's SCM_MAX_FD
// SCM_PIDFD (asm-generic/socket.h, Linux 6.5): older C library headers lack it.
constexpr int kScmPidfd = 0x04;
// A receive's control buffer: room for SCM_MAX_FD fds and, before them, the control messages a receiving socket's own
// options add (SO_PASSCRED's credentials, SO_TIMESTAMP*'s and SO_TIMESTAMPING's stamps, SO_PASSSEC's label,
// SO_RXQ_OVFL, SO_RCVMARK; SO_PASSPIDFD's pidfd comes after). The daemon sets none on its own sockets, but a Unix
// socket a client sent (DrainUnixQueue) has whatever options the client gave it: with only the fds' room, its
// credentials and a timestamp left no room for the last fds of a full message, which the kernel then dropped itself,
// in the draining thread (see DiscardQuietly). Labels are short (SELinux's well under the 1 KiB here).
constexpr size_t kControlBytes = CMSG_SPACE(kMaxFdsPerMessage * sizeof(int)) + 1024;
// SO_PASSRIGHTS (asm-generic/socket.h, Linux 6.16): older C library headers lack it.
constexpr int kSoPassRights = 83;
constexpr int64_t kMaxMessageBytes = 64 * 1024 * 1024;
constexpr int64_t kMaxBatch = 64;  // recvMessages: most messages per recvmmsg
// recvMessages' status per message (shared/native.ts reads them).
constexpr int32_t kRecvOk = 0;
constexpr int32_t kRecvEof = 1;
constexpr int32_t kRecvFdTruncated = 2;
constexpr int32_t kRecvMsgTruncated = 3;

// A SOCK_SEQPACKET read of 0 bytes and no fds is either an empty packet or the end of the stream: recvmsg says
// the same for both, and msg_flags too. The end is sticky (every later read returns it) and comes only once the
// peer has shut its sending side down, which poll shows as POLLRDHUP (POLLHUP when it closed); an empty packet is
// just a message (bad input for whoever parses it), and the peer may still be there to hear why.
bool PeerShutDown(int fd) {
  pollfd state = {fd, POLLRDHUP, 0};
  int ready;
  do {
    ready = ::poll(&state, 1, 0);
  } while (ready < 0 && errno == EINTR);
  // A poll that fails on our own fd: taken for the end, as before this check (the channel then closes).
  return ready != 0 && (ready < 0 || (state.revents & (POLLRDHUP | POLLHUP | POLLERR | POLLNVAL)) != 0);
}

// recvmmsg's entry before `next` read 0 bytes and no fds: the end only if no later entry of the batch carries
// anything (after the end, recvmmsg fills every slot with it) and the peer has shut down.
bool EndOfStream(int fd, const mmsghdr* messages, int next, int count) {
  for (int later = next; later < count; later++) {
    if (messages[later].msg_len != 0 || messages[later].msg_hdr.msg_controllen != 0) return false;
  }
  return PeerShutDown(fd);
}
constexpr int kPollEventMask = UV_READABLE | UV_WRITABLE | UV_DISCONNECT;

using FdSet = std::unordered_set<int>;

// Landlock's network rules (linux/landlock.h of Linux 6.7, ABI 4; the C library's copy of the header may be older):
// only what restrictTcpBind needs.
struct LandlockRulesetAttr {
  uint64_t handled_access_fs;
  uint64_t handled_access_net;
};
struct LandlockNetPortAttr {
  uint64_t allowed_access;
  uint64_t port;
};
constexpr uint32_t kLandlockCreateRulesetVersion = 1U << 0;
constexpr int kLandlockRuleNetPort = 2;
constexpr uint64_t kLandlockAccessNetBindTcp = 1ULL << 0;
constexpr long kLandlockFirstNetAbi = 4;

// glibc's struct tcp_info stops at tcpi_total_retrans; the kernel's (linux/tcp.h, which clashes with
// netinet/tcp.h) goes on with the byte counters. The same layout, continued.
struct KernelTcpInfo {
  tcp_info base;
  uint64_t pacing_rate;
  uint64_t max_pacing_rate;
  uint64_t bytes_acked;
  uint64_t bytes_received;
  uint32_t segs_out;
  uint32_t segs_in;
  uint32_t notsent_bytes;
  uint32_t min_rtt;
  uint32_t data_segs_in;
  uint32_t data_segs_out;
  uint64_t delivery_rate;
  uint64_t busy_time;
  uint64_t rwnd_limited;
  uint64_t sndbuf_limited;
  uint32_t delivered;
  uint32_t delivered_ce;
  uint64_t bytes_sent;
  uint64_t bytes_retrans;
};
static_assert(offsetof(KernelTcpInfo, pacing_rate) == 104, "tcp_info layout");
static_assert(offsetof(KernelTcpInfo, bytes_sent) == 200, "tcp_info layout");
constexpr size_t kTcpInfoFields = 5;
constexpr size_t kTcpInfoFieldsWithPeer = 9;  // the five above, then the peer in four words (TcpInfo)
constexpr size_t kTcpInfoFieldsWithMark = 12;  // then the inode and the two queue lengths (TcpInfo's withMark)
constexpr size_t kPeerWords = 4;               // the peer as WritePeerWords writes it

// ---------------------------------------------------------------------------------------------------------------
// Errors

// The errno's name (ECONNRESET), as Node reports it. libuv names only the errnos it maps (its UV_ERRNO_MAP) and
// calls the rest "Unknown system error <n>": ETOOMANYREFS (a send of fds past the sender's in-flight limit, see
// NOTES.md) among them, so the name then comes from the C library, where it has one.
std::string ErrnoName(int err) {
  char name[64];
  uv_err_name_r(-err, name, sizeof name);
  if (strncmp(name, "Unknown system error", 20) != 0) return name;
#if defined(__GLIBC__) && __GLIBC_PREREQ(2, 32)
  const char* known = strerrorname_np(err);
  if (known != nullptr) return known;
#endif
  return name;
}

// Node's shape for a failed syscall: `${syscall} ${code}[ ${detail}]`, errno negative as in libuv.
Napi::Error ErrnoError(Napi::Env env, int err, const char* syscall, const std::string& detail = std::string()) {
  const std::string code = ErrnoName(err);
  std::string message = std::string(syscall) + " " + code;
  if (!detail.empty()) message += " " + detail;
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("errno", Napi::Number::New(env, -err));
  error.Set("code", Napi::String::New(env, code));
  error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

[[noreturn]] void ThrowErrno(Napi::Env env, int err, const char* syscall, const std::string& detail = std::string()) {
  throw ErrnoError(env, err, syscall, detail);
}

// Our own failures: a SOCKPOOL_ERR_* code, and the syscall that revealed them.
Napi::Error CodeError(Napi::Env env, const char* code, const char* syscall, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  if (syscall != nullptr) error.Set("syscall", Napi::String::New(env, syscall));
  return error;
}

[[noreturn]] void ThrowTypeError(Napi::Env env, const char* code, const std::string& message) {
  Napi::TypeError error = Napi::TypeError::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  throw error;
}

[[noreturn]] void ThrowRangeError(Napi::Env env, const char* code, const std::string& message) {
  Napi::RangeError error = Napi::RangeError::New(env, message);
  error.Set("code", Napi::String::New(env, code));
  throw error;
}

// ---------------------------------------------------------------------------------------------------------------
// Arguments (the TypeScript wrapper types them; these checks keep a wrong call from reaching a syscall)

int64_t IntegerArg(const Napi::CallbackInfo& info, size_t index, const char* name, int64_t min, int64_t max) {
  Napi::Env env = info.Env();
  if (!info[index].IsNumber()) {
    ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", std::string("The \"") + name + "\" argument must be of type number");
  }
  const double value = info[index].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(value) || std::floor(value) != value || value < static_cast<double>(min) ||
      value > static_cast<double>(max)) {
    ThrowRangeError(env, "ERR_OUT_OF_RANGE",
                    std::string("The value of \"") + name + "\" is out of range. It must be an integer >= " +
                        std::to_string(min) + " and <= " + std::to_string(max));
  }
  return static_cast<int64_t>(value);
}

bool IsAbsent(const Napi::CallbackInfo& info, size_t index) {
  return info.Length() <= index || info[index].IsUndefined() || info[index].IsNull();
}

int FdArg(const Napi::CallbackInfo& info, size_t index) {
  return static_cast<int>(IntegerArg(info, index, "fd", 0, INT32_MAX));
}

bool BoolArg(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (!info[index].IsBoolean()) {
    ThrowTypeError(info.Env(), "ERR_INVALID_ARG_TYPE",
                   std::string("The \"") + name + "\" argument must be of type boolean");
  }
  return info[index].As<Napi::Boolean>().Value();
}

std::string StringArg(const Napi::CallbackInfo& info, size_t index, const char* name) {
  if (!info[index].IsString()) {
    ThrowTypeError(info.Env(), "ERR_INVALID_ARG_TYPE",
                   std::string("The \"") + name + "\" argument must be of type string");
  }
  return info[index].As<Napi::String>().Utf8Value();
}

struct Bytes {
  uint8_t* data;
  size_t length;
};

// A typed array argument's kind, element count and data, read with one napi_get_typedarray_info. (node-addon-api's
// As<Napi::TypedArrayOf<T>>() asks twice per conversion, and the calls on the daemon's hot path converted their
// arguments several times each.) False when the argument is not a typed array.
struct TypedArrayView {
  napi_typedarray_type type;
  size_t length;  // elements
  void* data;
};

bool ReadTypedArray(const Napi::CallbackInfo& info, size_t index, TypedArrayView* view) {
  napi_env env = info.Env();
  napi_value value = info[index];
  bool is_typed_array = false;
  if (napi_is_typedarray(env, value, &is_typed_array) != napi_ok || !is_typed_array) return false;
  return napi_get_typedarray_info(env, value, &view->type, &view->length, &view->data, nullptr, nullptr) == napi_ok;
}

// A Float64Array argument of at least `min_length` elements, or the TypeError `message`.
double* Float64ArrayArg(const Napi::CallbackInfo& info, size_t index, size_t min_length, const char* message) {
  TypedArrayView view;
  if (!ReadTypedArray(info, index, &view) || view.type != napi_float64_array || view.length < min_length) {
    throw Napi::TypeError::New(info.Env(), message);
  }
  return static_cast<double*>(view.data);
}

Bytes BytesArg(const Napi::CallbackInfo& info, size_t index, const char* name) {
  TypedArrayView view;
  if (!ReadTypedArray(info, index, &view) || view.type != napi_uint8_array) {
    ThrowTypeError(info.Env(), "ERR_INVALID_ARG_TYPE",
                   std::string("The \"") + name + "\" argument must be an instance of Uint8Array");
  }
  return Bytes{static_cast<uint8_t*>(view.data), view.length};
}

// The fds of one message: on the stack (SCM_MAX_FD of them fit), not a heap vector per send.
struct FdList {
  int fds[kMaxFdsPerMessage];
  size_t count = 0;
  bool empty() const { return count == 0; }
  size_t size() const { return count; }
  const int* data() const { return fds; }
};

// An entry of an fd list: a non-negative integer.
int FdEntry(Napi::Env env, const Napi::Value& item) {
  if (!item.IsNumber()) ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "every entry of \"fds\" must be a number");
  const double fd = item.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(fd) || std::floor(fd) != fd || fd < 0 || fd > INT32_MAX) {
    ThrowRangeError(env, "ERR_OUT_OF_RANGE", "every entry of \"fds\" must be a non-negative integer");
  }
  return static_cast<int>(fd);
}

// One fd may come as a number instead of a one-element array: the daemon's every lease sends one, and the array's
// reading (its type, length, element, the element's type) was most of this call's own cost.
void FdListArg(const Napi::CallbackInfo& info, size_t index, FdList* list) {
  list->count = 0;
  if (IsAbsent(info, index)) return;
  Napi::Env env = info.Env();
  if (info[index].IsNumber()) {
    list->fds[list->count++] = FdEntry(env, info[index]);
    return;
  }
  if (!info[index].IsArray()) {
    ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "The \"fds\" argument must be an array or one fd");
  }
  Napi::Array array = info[index].As<Napi::Array>();
  const uint32_t length = array.Length();
  if (length > kMaxFdsPerMessage) {
    ThrowRangeError(env, "ERR_OUT_OF_RANGE", "at most 253 fds fit in one message (SCM_MAX_FD)");
  }
  for (uint32_t i = 0; i < length; i++) list->fds[list->count++] = FdEntry(env, array.Get(i));
}

// ---------------------------------------------------------------------------------------------------------------
// Small syscall helpers

// Every socket this addon closes gets its linger turned off first (but through closeNeverShared, whose caller
// vouches that no other process ever held a copy). A client can set SO_LINGER on a socket it sends us, or on its
// copy of one we lent it; then close() of the last copy, even of a non-blocking socket, waits up to the linger time
// (any number of seconds) while unsent data is queued, and the thread that closes it (the daemon's only one) serves
// nobody meanwhile. {0, 0} is the kernel's default: close() returns at once and the
// kernel sends what is queued in the background (never an RST, as {1, 0} would). Not a socket: ENOTSOCK, ignored.
void DisarmLinger(int fd) {
  const linger off = {0, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &off, sizeof off);
}

void CloseQuietly(int fd) {
  const int saved = errno;
  DisarmLinger(fd);
  ::close(fd);  // Linux releases the fd even when close() reports EINTR: never retry.
  errno = saved;
}

// Whether `fd` is a socket, asked of the socket layer (getsockopt) and never of the file's filesystem: fstat of an fd a
// client sent may fail, or wait for the client. A FUSE mount of the client's own user (fusermount's, no allow_other)
// refuses every other user its files' attributes (EACCES) but not the FLUSH of their close: an fd taken for a socket
// because its fstat failed was closed in the calling thread, which then waited for the client's answer for good (see
// DeferredCloser). And a file whose attributes the mount lets nobody cache makes every fstat a GETATTR request, waited
// for as uninterruptibly: a signal sends the mount an INTERRUPT it may ignore, and only SIGKILL ends the wait.
// 1: a socket; 0: open but no socket (an O_PATH fd too, which the socket layer does not take); -1 and errno: not open.
// Only a socket gets past the socket layer's own check (ENOTSOCK): any other refusal (a cgroup's getsockopt program)
// is a socket's.
int SocketKind(int fd) {
  int type = 0;
  socklen_t length = sizeof type;
  if (::getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &length) == 0) return 1;
  const int err = errno;
  if (err == ENOTSOCK) return 0;
  if (err != EBADF) return 1;
  if (::fcntl(fd, F_GETFD) >= 0) return 0;  // O_PATH: open, but no socket operation takes it
  errno = err;
  return -1;
}

// Owns an fd until release(): the error paths of the creating functions close it on the way out.
class FdGuard {
 public:
  explicit FdGuard(int fd) : fd_(fd) {}
  ~FdGuard() {
    if (fd_ >= 0) CloseQuietly(fd_);
  }
  FdGuard(const FdGuard&) = delete;
  FdGuard& operator=(const FdGuard&) = delete;
  int get() const { return fd_; }
  // Closes the fd held (if any) and owns `fd` instead.
  void reset(int fd) {
    if (fd_ >= 0) CloseQuietly(fd_);
    fd_ = fd;
  }
  int release() {
    const int fd = fd_;
    fd_ = -1;
    return fd;
  }

 private:
  int fd_;
};

int SocketOrThrow(Napi::Env env, int domain, int type) {
  const int fd = ::socket(domain, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) ThrowErrno(env, errno, "socket");
  return fd;
}

int GetIntOption(Napi::Env env, int fd, int level, int name) {
  int value = 0;
  socklen_t length = sizeof value;
  if (::getsockopt(fd, level, name, &value, &length) < 0) ThrowErrno(env, errno, "getsockopt");
  return value;
}

void SetOption(Napi::Env env, int fd, int level, int name, const void* value, socklen_t length,
               const char* option_name) {
  if (::setsockopt(fd, level, name, value, length) < 0) ThrowErrno(env, errno, "setsockopt", option_name);
}

void SetIntOption(Napi::Env env, int fd, int level, int name, int value, const char* option_name) {
  SetOption(env, fd, level, name, &value, sizeof value, option_name);
}

// AF_UNIX address; a leading '@' names the abstract namespace (the '@' becomes the leading NUL byte).
socklen_t UnixAddress(Napi::Env env, const std::string& path, sockaddr_un* address, const char* syscall) {
  memset(address, 0, sizeof *address);
  address->sun_family = AF_UNIX;
  const bool abstract = !path.empty() && path[0] == '@';
  if (path.empty() || (!abstract && path.find('\0') != std::string::npos)) {
    ThrowTypeError(env, "ERR_INVALID_ARG_VALUE", "invalid unix socket path");
  }
  const size_t limit = abstract ? sizeof address->sun_path : sizeof address->sun_path - 1;
  if (path.size() > limit) ThrowErrno(env, ENAMETOOLONG, syscall, path);
  memcpy(address->sun_path, path.data(), path.size());
  if (abstract) address->sun_path[0] = '\0';
  return static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + (abstract ? 0 : 1));
}

struct InetAddress {
  sockaddr_storage storage;
  socklen_t length;
};

[[noreturn]] void ThrowInvalidAddress(Napi::Env env, const std::string& address, int family) {
  ThrowTypeError(env, "ERR_INVALID_IP_ADDRESS",
                 "Invalid IPv" + std::to_string(family) + " address: " + address);
}

// Numeric IPv4 or IPv6 address (an IPv6 zone, "fe80::1%eth0", is accepted) for a socket of the given domain.
InetAddress ParseInet(Napi::Env env, int domain, const std::string& address, int port) {
  InetAddress result;
  memset(&result, 0, sizeof result);
  if (address.find('\0') != std::string::npos) ThrowInvalidAddress(env, address, domain == AF_INET6 ? 6 : 4);
  if (domain == AF_INET) {
    auto* in4 = reinterpret_cast<sockaddr_in*>(&result.storage);
    in4->sin_family = AF_INET;
    in4->sin_port = htons(static_cast<uint16_t>(port));
    if (::inet_pton(AF_INET, address.c_str(), &in4->sin_addr) != 1) ThrowInvalidAddress(env, address, 4);
    result.length = sizeof *in4;
  } else if (domain == AF_INET6) {
    auto* in6 = reinterpret_cast<sockaddr_in6*>(&result.storage);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(static_cast<uint16_t>(port));
    std::string host = address;
    const size_t percent = address.find('%');
    if (percent != std::string::npos) {
      host = address.substr(0, percent);
      const std::string zone = address.substr(percent + 1);
      unsigned int index = zone.empty() ? 0 : ::if_nametoindex(zone.c_str());
      if (index == 0 && !zone.empty() && zone.find_first_not_of("0123456789") == std::string::npos &&
          zone.size() < 10) {
        index = static_cast<unsigned int>(std::stoul(zone));
      }
      if (index == 0) ThrowInvalidAddress(env, address, 6);
      in6->sin6_scope_id = index;
    }
    if (::inet_pton(AF_INET6, host.c_str(), &in6->sin6_addr) != 1) ThrowInvalidAddress(env, address, 6);
    result.length = sizeof *in6;
  } else {
    ThrowErrno(env, EAFNOSUPPORT, "socket", "(not an IPv4 or IPv6 socket)");
  }
  return result;
}

// `address:port` as Node prints it in connect errors (IPv6 without brackets).
std::string Endpoint(const std::string& address, int port) { return address + ":" + std::to_string(port); }

// A peer as four numbers (no object, no text), the release check's comparison: family * 65536 + port, then the
// address in words of at most 48 bits (IPv4: the address, 0, 0; IPv6: bytes 0-5, 6-11, 12-15), so equal numbers
// mean the same peer. false (nothing written) for a family other than IPv4 and IPv6.
bool WritePeerWords(const sockaddr_storage& peer, double* out) {
  const auto bytes_word = [](const uint8_t* bytes, int count) {
    double word = 0;
    for (int i = 0; i < count; i++) word = word * 256 + bytes[i];
    return word;
  };
  if (peer.ss_family == AF_INET) {
    const auto* in4 = reinterpret_cast<const sockaddr_in*>(&peer);
    out[0] = 4 * 65536.0 + ntohs(in4->sin_port);
    out[1] = bytes_word(reinterpret_cast<const uint8_t*>(&in4->sin_addr), 4);
    out[2] = 0;
    out[3] = 0;
    return true;
  }
  if (peer.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&peer);
    const uint8_t* address = in6->sin6_addr.s6_addr;
    out[0] = 6 * 65536.0 + ntohs(in6->sin6_port);
    out[1] = bytes_word(address, 6);
    out[2] = bytes_word(address + 6, 6);
    out[3] = bytes_word(address + 12, 4);
    return true;
  }
  return false;
}

Napi::Object FormatInet(Napi::Env env, const sockaddr_storage& storage, const char* syscall) {
  char text[INET6_ADDRSTRLEN + IF_NAMESIZE + 2] = {0};
  Napi::Object result = Napi::Object::New(env);
  if (storage.ss_family == AF_INET) {
    const auto* in4 = reinterpret_cast<const sockaddr_in*>(&storage);
    ::inet_ntop(AF_INET, &in4->sin_addr, text, sizeof text);
    result.Set("family", 4);
    result.Set("address", text);
    result.Set("port", ntohs(in4->sin_port));
  } else if (storage.ss_family == AF_INET6) {
    const auto* in6 = reinterpret_cast<const sockaddr_in6*>(&storage);
    ::inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    std::string address = text;
    if (in6->sin6_scope_id != 0) {
      char name[IF_NAMESIZE] = {0};
      address += "%";
      address += ::if_indextoname(in6->sin6_scope_id, name) != nullptr ? std::string(name)
                                                                          : std::to_string(in6->sin6_scope_id);
    }
    result.Set("family", 6);
    result.Set("address", address);
    result.Set("port", ntohs(in6->sin6_port));
  } else {
    ThrowErrno(env, EAFNOSUPPORT, syscall, "(not an IPv4 or IPv6 socket)");
  }
  return result;
}

// Control buffer for SCM_RIGHTS, aligned for cmsghdr.
// Room for one SCM_RIGHTS message of up to SCM_MAX_FD fds, on the stack of the send that uses it.
struct RightsBuffer {
  alignas(cmsghdr) unsigned char bytes[CMSG_SPACE(kMaxFdsPerMessage * sizeof(int))];
};

void AttachRights(msghdr* message, RightsBuffer* buffer, const FdList& fds) {
  if (fds.empty()) return;
  const size_t payload = fds.size() * sizeof(int);
  const size_t length = CMSG_SPACE(payload);
  memset(buffer->bytes, 0, length);
  message->msg_control = buffer->bytes;
  message->msg_controllen = length;
  cmsghdr* header = CMSG_FIRSTHDR(message);
  header->cmsg_level = SOL_SOCKET;
  header->cmsg_type = SCM_RIGHTS;
  header->cmsg_len = CMSG_LEN(payload);
  memcpy(CMSG_DATA(header), fds.data(), payload);
}

// Calls `take(fd)` for every fd that arrived in `message`'s SCM_RIGHTS control messages (received fds: the caller
// owns each one from that call on). A pidfd of the sender's process (SCM_PIDFD: the receiving socket has
// SO_PASSPIDFD, which a client can set on a socket it sends us, see DrainUnixQueue) is an fd installed in our table
// too: nobody asked for it, so it is closed here (a pidfd's close never waits), never left open.
template <typename Take>
void ForEachReceivedFd(msghdr* message, Take&& take) {
  if (message->msg_controllen == 0) return;
  for (cmsghdr* header = CMSG_FIRSTHDR(message); header != nullptr; header = CMSG_NXTHDR(message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_len < CMSG_LEN(0)) continue;
    const bool rights = header->cmsg_type == SCM_RIGHTS;
    if (!rights && header->cmsg_type != kScmPidfd) continue;
    const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    const unsigned char* payload = CMSG_DATA(header);
    for (size_t i = 0; i < count; i++) {
      int received_fd;
      memcpy(&received_fd, payload + i * sizeof(int), sizeof received_fd);
      if (rights) {
        take(received_fd);
      } else {
        const int saved = errno;
        ::close(received_fd);
        errno = saved;
      }
    }
  }
}

// How many fds wait in flight in a Unix socket's receive queue ("scm_fds" in /proc/self/fdinfo, Linux 5.6+); -1
// when that cannot be read.
int QueuedFds(int fd) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/fdinfo/%d", fd);
  const int info = ::open(path, O_RDONLY | O_CLOEXEC);
  if (info < 0) return -1;
  char text[1024];
  ssize_t length;
  do {
    length = ::read(info, text, sizeof text - 1);
  } while (length < 0 && errno == EINTR);
  ::close(info);
  if (length <= 0) return -1;
  text[length] = '\0';
  const char* field = strstr(text, "scm_fds:");
  return field == nullptr ? -1 : atoi(field + strlen("scm_fds:"));
}

// Whose fds a discard closes: the uid of the client that sent them (its share of the closing threads, see
// DeferredCloser), or kUnknownUid where no caller said (a share of its own).
constexpr int64_t kUnknownUid = -1;

void DiscardQuietly(int fd, int depth, int64_t uid);

// The uid of the peer of the Unix socket `fd` (SO_PEERCRED): whose fds a message received on it carried.
int64_t PeerUid(int fd) {
  ucred credentials{};
  socklen_t length = sizeof credentials;
  if (::getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) return kUnknownUid;
  return credentials.uid;
}

// Every fd queued in the Unix socket `fd` (a message a client sent that nobody read, or one inside a socket a client
// sent), taken out and discarded, so that none is dropped by the kernel when `fd` closes. The kernel's drop of the
// last reference runs in the closing thread with no DisarmLinger before it: a TCP socket queued there with SO_LINGER
// set and unsent data would hold the daemon's thread for its linger time. shutdown(SHUT_RD) first: the peer cannot
// queue more while we drain (its sends fail with EPIPE). Only for sockets whose queue is ours to drop.
void DrainUnixQueue(int fd, int depth, int64_t uid) {
  int listening = 0;
  socklen_t length = sizeof listening;
  if (::getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &length) == 0 && listening != 0) {
    // A listening socket's pending connections may hold fds their peers sent before any accept. Shut down first, so
    // no new connection arrives (connect() is refused) while we accept the pending ones. Non-blocking too (the flag
    // is the sender's open file's, which is being discarded): accept must never wait in this thread.
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    ::shutdown(fd, SHUT_RD);
    for (;;) {
      const int accepted = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (accepted >= 0) {
        DiscardQuietly(accepted, depth + 1, uid);
      } else if (errno != EINTR && errno != ECONNABORTED) {
        return;
      }
    }
  }
  // Shut first, then look: a message the peer sends between a look that finds nothing and the close would be
  // queued, and dropped by the close (a clean-clone run of test/daemon-linger caught it with refused clients). Once
  // shut, the peer's sends fail (EPIPE): nothing more can be queued.
  ::shutdown(fd, SHUT_RD);
  if (QueuedFds(fd) == 0) return;  // nothing in flight: dropping the queue closes no fd
  const int on = 1;
  ::setsockopt(fd, SOL_SOCKET, SO_OOBINLINE, &on, sizeof on);  // a stream's out-of-band byte may carry fds too
  static thread_local uint8_t data[4096];  // what the messages say does not matter
  uint64_t control[(kControlBytes + 7) / 8];
  std::vector<int> fds;
  // Each round takes one message out of a queue that cannot grow: the bound only guards against the unexpected.
  for (int round = 0; round < 1 << 20; round++) {
    iovec vector{data, sizeof data};
    msghdr message;
    memset(&message, 0, sizeof message);
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    const ssize_t received = ::recvmsg(fd, &message, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (received < 0 && errno == EINTR) continue;
    if (received < 0) return;  // EAGAIN: empty (a datagram socket), or an error
    fds.clear();
    ForEachReceivedFd(&message, [&fds](int received_fd) { fds.push_back(received_fd); });
    for (const int received_fd : fds) DiscardQuietly(received_fd, depth + 1, uid);
    // 0 bytes and no fd: the queue is empty (a shut-down socket reads as EOF), or this was an empty message.
    if (received == 0 && fds.empty() && QueuedFds(fd) <= 0) return;
  }
}

// Closes, in threads of their own, fds a client sent that are not sockets. close() calls the file's flush, and a
// flush may wait for whoever serves the file: a file on the client's own FUSE mount sends FUSE_FLUSH and waits for
// the answer uninterruptibly (no signal, not even SIGKILL, ends it; only an answer or an abort of the FUSE
// connection does); a tty may wait for its output to drain. Every way of taking an fd out of the table (close, dup2,
// close_range) flushes, so the daemon's thread must never do it for such an fd.
// One thread (the owner) takes the queue's fds one at a time. A close can hold its thread for good, so one client's
// stuck close must not hold every other client's fds open behind it: a watcher thread, woken only while a close is
// under way with more fds queued behind it, hands the queue to a fresh owner once that close has lasted
// kCloserPatience. The thread taken over from ends when its close returns, whenever that is. At most
// kMaxStuckClosers threads taken over from may be inside their closes at once (a hostile client can hold as many
// closes as it sends fds): past that, the fds queued wait for one of them to return, and stats say so
// (native.deferredCloses; the fd table is the bound). Each fd is queued with the uid that sent it, and at most
// kMaxClosingPerUid threads are inside closes of one uid's fds (the owner's included): that uid's further fds wait
// for one of those closes to return, while other uids' fds are taken past them (the queue is one per uid, taken in
// turn), so one uid holding closes takes its share of the threads, not the whole cap. A fixed share alone would let a
// few uids together (as many as the cap holds shares) hold every thread, and every other uid's fds, and the daemon's
// own, wait for good. So the share shrinks as threads are held (MayTake): a uid inside a close already takes another
// only while fewer than kMaxClosingPerUid threads are inside closes in all, so past those each thread goes to a uid
// holding none, and holding them all takes a uid for nearly every thread; and the last kKeptForUidless threads are
// never a uid's, only the discards no uid is charged with (the daemon's own, a client's before its credentials are
// read), so no set of uids, however large (a user given subordinate uids has thousands), holds every thread. A
// process with a thread stuck so cannot finish exiting until the close returns (the kernel waits for every thread;
// nothing here joins one). The daemon refuses fds at the kernel where it can (SO_PASSRIGHTS), so this is the fallback
// for older kernels and for `access.acceptClientFds`.
constexpr auto kCloserPatience = std::chrono::milliseconds(200);
constexpr int kMaxStuckClosers = 16;
constexpr int kClosingThreads = kMaxStuckClosers + 1;  // the threads taken over from, and the owner
constexpr int kMaxClosingPerUid = 4;
constexpr int kKeptForUidless = 1;

// The share rule (DeferredCloser): whether a closing thread may take an fd of `uid`, whose fds `holding` threads are
// inside closes of, while `closing` threads are inside closes in all.
bool MayTake(int64_t uid, int holding, int closing) {
  const int free = kClosingThreads - closing;
  if (free <= (uid == kUnknownUid ? 0 : kKeptForUidless)) return false;
  return holding == 0 || (holding < kMaxClosingPerUid && closing < kMaxClosingPerUid);
}

class DeferredCloser {
 public:
  static void Close(int fd, int64_t uid) { Instance().Push(fd, uid); }

  struct Counts {
    size_t queued = 0;  // fds waiting for a closing thread
    int stuck = 0;      // closing threads inside one close for longer than kCloserPatience
  };
  static Counts Snapshot() {
    DeferredCloser* closer = instance_.load(std::memory_order_acquire);
    if (closer == nullptr) return {};
    std::lock_guard<std::mutex> lock(closer->mutex_);
    Counts counts;
    counts.queued = closer->queued_;
    counts.stuck = closer->taken_over_;
    if (closer->closing_ && std::chrono::steady_clock::now() - closer->close_began_ >= kCloserPatience) counts.stuck++;
    return counts;
  }

 private:
  static DeferredCloser& Instance() {
    // Never destroyed: its threads may outlive every caller, and a stuck one returns from close() whenever it does.
    static DeferredCloser* closer = [] {
      auto* created = new DeferredCloser();
      instance_.store(created, std::memory_order_release);
      return created;
    }();
    return *closer;
  }

  DeferredCloser() {
    std::lock_guard<std::mutex> lock(mutex_);
    const uint64_t id = next_id_++;
    if (StartThread("sockpool-close", [this, id] { Own(id); })) owner_ = id;
    // Without a watcher the owner closes as one thread would; without an owner the watcher starts one. A watcher the
    // system had no thread for now is tried again at a later Push (StartWatcher): made once a process, the closer
    // would otherwise go without it for good (and, without an owner too, leave every fd queued open).
    StartWatcher();
  }

  // Starts the watcher if it is not running, at most once per kCloserPatience while the system has no thread to
  // give. mutex_ held.
  void StartWatcher() {
    if (watcher_) return;
    const auto now = std::chrono::steady_clock::now();
    if (now < next_watcher_try_) return;
    if (StartThread("sockpool-cwatch", [this] { Watch(); })) {
      watcher_ = true;
    } else {
      next_watcher_try_ = now + kCloserPatience;
    }
  }

  // False when the system has no thread to give (std::system_error, or std::bad_alloc when there is no memory for
  // one): the caller goes on without it, and tries again later. The name (15 characters at most) tells an operator's
  // `top -H` what the threads are, and the tests count them by it.
  static bool StartThread(const char* name, std::function<void()> body) {
    try {
      std::thread([name, body = std::move(body)] {
        pthread_setname_np(pthread_self(), name);
        sigset_t all;
        sigfillset(&all);
        pthread_sigmask(SIG_BLOCK, &all, nullptr);  // signals are the process's threads' to take, not these
        body();
      }).detach();
      return true;
    } catch (const std::system_error&) {
      return false;
    } catch (const std::bad_alloc&) {
      return false;
    }
  }

  void Push(int fd, int64_t uid) {
    bool watch;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      std::deque<int>& fds = queues_[uid];
      if (fds.empty()) turns_.push_back(uid);
      fds.push_back(fd);
      queued_++;
      StartWatcher();  // (nothing to do once it runs)
      watch = closing_ || owner_ == 0;
    }
    work_.notify_one();
    if (watch) watch_.notify_one();
  }

  // The first uid in turn with fds queued that MayTake a thread, or turns_.end(). (Under the mutex; turns_ holds only
  // uids with fds queued, so the look is bounded by the uids, not the fds.)
  std::deque<int64_t>::iterator NextTurn() {
    return std::find_if(turns_.begin(), turns_.end(), [this](int64_t uid) {
      const auto holding = closing_by_uid_.find(uid);
      return MayTake(uid, holding == closing_by_uid_.end() ? 0 : holding->second, closing_in_all_);
    });
  }
  bool Takeable() { return NextTurn() != turns_.end(); }

  // Takes the next fd to close (Takeable() must be true): its uid's oldest, the uid going to the back of the turns
  // if it has more.
  std::pair<int, int64_t> Take() {
    const auto turn = NextTurn();
    const int64_t uid = *turn;
    turns_.erase(turn);
    std::deque<int>& fds = queues_[uid];
    const int fd = fds.front();
    fds.pop_front();
    if (fds.empty()) {
      queues_.erase(uid);
    } else {
      turns_.push_back(uid);
    }
    queued_--;
    closing_by_uid_[uid]++;
    closing_in_all_++;
    return {fd, uid};
  }

  // The owner's loop: only the owner waits for work, and a thread taken over from ends when its close returns (the
  // new owner has the queue by then), so no fd is taken twice and none is left behind.
  void Own(uint64_t id) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      work_.wait(lock, [this] { return Takeable(); });
      const auto [fd, uid] = Take();
      closing_ = true;
      closes_begun_++;
      close_began_ = std::chrono::steady_clock::now();
      const bool more = Takeable();
      lock.unlock();
      if (more) watch_.notify_one();
      ::close(fd);
      lock.lock();
      if (--closing_by_uid_[uid] == 0) closing_by_uid_.erase(uid);
      closing_in_all_--;
      if (owner_ != id) {
        taken_over_--;
        lock.unlock();
        watch_.notify_one();  // room under kMaxStuckClosers again
        work_.notify_one();   // and under the shares: the owner may be waiting for a takeable fd
        return;
      }
      closing_ = false;
    }
  }

  // The watcher: parked while no close is under way with fds behind it that could be taken (of a uid under its
  // share); otherwise wakes when that close has lasted kCloserPatience, and hands the queue to a fresh owner (or
  // starts the first, if the system had no thread for it).
  void Watch() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      watch_.wait(lock, [this] { return (closing_ || owner_ == 0) && Takeable(); });
      if (owner_ == 0) {
        const uint64_t id = next_id_;
        if (StartThread("sockpool-close", [this, id] { Own(id); })) {
          next_id_++;
          owner_ = id;
        } else {
          watch_.wait_for(lock, kCloserPatience);  // no thread to be had: try again later
        }
        continue;
      }
      const uint64_t close = closes_begun_;
      // Nothing takeable behind the close (only fds of uids at their share, or none): a fresh owner would only wait.
      const auto moved_on = [this, close] { return !closing_ || closes_begun_ != close || !Takeable(); };
      if (watch_.wait_until(lock, close_began_ + kCloserPatience, moved_on)) continue;
      if (taken_over_ >= kMaxStuckClosers) {
        // A stuck thread's return (or the owner's) notifies this wait; a close the owner ends quietly is seen within
        // kCloserPatience.
        const auto room = [this, &moved_on] { return taken_over_ < kMaxStuckClosers || moved_on(); };
        watch_.wait_for(lock, kCloserPatience, room);
        continue;
      }
      const uint64_t id = next_id_;
      if (!StartThread("sockpool-close", [this, id] { Own(id); })) {
        watch_.wait_for(lock, kCloserPatience, moved_on);  // no thread to be had: try again later
        continue;
      }
      next_id_++;
      owner_ = id;
      taken_over_++;
      closing_ = false;  // the new owner's until it begins one; the old one's close is counted in taken_over_
    }
  }

  static std::atomic<DeferredCloser*> instance_;
  std::mutex mutex_;
  std::condition_variable work_;   // the owner waits here for fds
  std::condition_variable watch_;  // the watcher waits here
  std::unordered_map<int64_t, std::deque<int>> queues_;  // the fds queued, by the uid that sent them
  std::deque<int64_t> turns_;                            // the uids with fds queued, in turn
  size_t queued_ = 0;
  std::unordered_map<int64_t, int> closing_by_uid_;  // threads inside a close of the uid's fds, the owner's included
  int closing_in_all_ = 0;                           // threads inside a close, the owner's included
  uint64_t owner_ = 0;  // the id of the thread that takes fds from the queue
  bool watcher_ = false;  // the watcher runs (it never ends)
  std::chrono::steady_clock::time_point next_watcher_try_;  // no watcher: when StartWatcher may try again
  uint64_t next_id_ = 1;
  bool closing_ = false;  // the owner is inside a close
  uint64_t closes_begun_ = 0;
  std::chrono::steady_clock::time_point close_began_;
  int taken_over_ = 0;  // threads taken over from, still inside their closes
};
std::atomic<DeferredCloser*> DeferredCloser::instance_{nullptr};

// Closes an fd a client may have prepared (see DisarmLinger, DrainUnixQueue and DeferredCloser). Nesting is bounded
// by the kernel (a Unix socket in flight inside another, at most 4 deep); the depth bound only guards against the
// unexpected.
void DiscardQuietly(int fd, int depth, int64_t uid) {
  const int saved = errno;
  // Not fstat, which may itself wait for the client (see SocketKind). An fd that is not open (-1) is left alone.
  const int kind = SocketKind(fd);
  if (kind == 0) DeferredCloser::Close(fd, uid);
  if (kind != 1) {
    errno = saved;
    return;
  }
  DisarmLinger(fd);
  int domain = 0;
  socklen_t length = sizeof domain;
  if (depth < 8 && ::getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &domain, &length) == 0 && domain == AF_UNIX) {
    DrainUnixQueue(fd, depth, uid);
  }
  ::close(fd);
  errno = saved;
}

// ---------------------------------------------------------------------------------------------------------------
// The close watchdog
//
// DisarmLinger keeps the closes this addon makes from waiting, but not every last close of a socket a client
// prepared is ours to disarm: the kernel drops fds by itself (past what fits in a thread's fd table; the FUSE-like
// cases we cannot drain), and a client holding a copy of a lent socket can set SO_LINGER again between our disarm
// and our close, then close its copy. Such a close waits in the kernel for the linger time, but interruptibly: a
// signal ends the wait, and the socket is then closed in the background as if it had no linger. So a watchdog
// thread looks at the calls here that close or receive fds (WatchedCall) every kWatchdogPeriodMs, and signals a
// thread found in the same call twice in a row; the handler does nothing, and the wait ends on any pending signal.
// SA_RESTART: a signal that lands after the call returned (the thread left it between the watchdog's look and its
// signal) restarts whatever interrupted syscall it meets instead of failing it with EINTR.
// On only where the daemon asks (startCloseWatchdog): a library must not take over a signal of its users' process.
// An idle daemon must not wake 40 times a second for nothing: after kWatchdogIdleLooks looks in a row that found no
// call entered and none inside, the watchdog parks on a condition variable, and the next watched call wakes it (one
// futex wake per idle-to-busy change, none while calls keep coming).
constexpr int kWatchdogSignal = SIGURG;  // ignored by default; Node and libuv leave it alone
constexpr auto kWatchdogPeriod = std::chrono::milliseconds(25);
constexpr int kWatchdogIdleLooks = 40;

struct WatchedThread {
  pthread_t thread;
  std::atomic<uint64_t> entered{0};  // watched calls this thread entered so far
  std::atomic<bool> inside{false};
  uint64_t seen = 0;  // the watchdog's own: `entered` at its last look
};

std::atomic<bool> watchdog_on{false};
// Set by the watchdog before it parks, cleared (under WatchdogParkMutex) by the call that wakes it. Both sides use
// sequentially consistent order: a call stores `inside` then loads `parked`, the watchdog stores `parked` then loads
// every `inside` and `entered` again, so at least one of them sees the other (no call is left unwatched).
std::atomic<bool> watchdog_parked{false};
std::mutex& WatchdogParkMutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::condition_variable& WatchdogWake() {
  static auto* wake = new std::condition_variable();
  return *wake;
}
// Never destroyed: the watchdog thread runs until the process ends, past static destructors.
std::mutex& WatchedMutex() {
  static auto* mutex = new std::mutex();
  return *mutex;
}
std::vector<WatchedThread*>& Watched() {
  static auto* threads = new std::vector<WatchedThread*>();
  return *threads;
}

// A thread's entry in Watched(), taken out when the thread ends (under the mutex: while the watchdog holds it, every
// thread listed is alive, so its pthread_t is valid for pthread_kill).
struct WatchedThreadEntry {
  WatchedThread* thread = nullptr;
  ~WatchedThreadEntry() {
    if (thread == nullptr) return;
    {
      std::lock_guard<std::mutex> lock(WatchedMutex());
      auto& threads = Watched();
      threads.erase(std::remove(threads.begin(), threads.end(), thread), threads.end());
    }
    delete thread;
  }
};
thread_local WatchedThreadEntry this_thread_entry;

WatchedThread* ThisWatchedThread() {
  if (this_thread_entry.thread == nullptr) {
    auto* thread = new WatchedThread();
    thread->thread = pthread_self();
    std::lock_guard<std::mutex> lock(WatchedMutex());
    Watched().push_back(thread);
    this_thread_entry.thread = thread;
  }
  return this_thread_entry.thread;
}

// Marks a call the watchdog may interrupt (one relaxed load when the watchdog is off).
class WatchedCall {
 public:
  WatchedCall() : thread_(watchdog_on.load(std::memory_order_relaxed) ? ThisWatchedThread() : nullptr) {
    if (thread_ == nullptr) return;
    thread_->entered.fetch_add(1, std::memory_order_relaxed);
    thread_->inside.store(true, std::memory_order_seq_cst);
    if (watchdog_parked.load(std::memory_order_seq_cst)) {
      {
        std::lock_guard<std::mutex> lock(WatchdogParkMutex());
        watchdog_parked.store(false, std::memory_order_seq_cst);
      }
      WatchdogWake().notify_one();
    }
  }
  ~WatchedCall() {
    if (thread_ != nullptr) thread_->inside.store(false, std::memory_order_release);
  }
  WatchedCall(const WatchedCall&) = delete;
  WatchedCall& operator=(const WatchedCall&) = delete;

 private:
  WatchedThread* thread_;
};

void WatchdogLoop() {
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, nullptr);  // the process's signals go to the threads that handle them
  int idle_looks = 0;
  for (;;) {
    std::this_thread::sleep_for(kWatchdogPeriod);
    bool busy = false;
    {
      std::lock_guard<std::mutex> lock(WatchedMutex());
      for (WatchedThread* thread : Watched()) {
        const uint64_t entered = thread->entered.load(std::memory_order_relaxed);
        const bool inside = thread->inside.load(std::memory_order_acquire);
        if (inside && entered == thread->seen) {
          pthread_kill(thread->thread, kWatchdogSignal);  // again at each look, until the call returns
        }
        busy = busy || inside || entered != thread->seen;
        thread->seen = entered;
      }
    }
    idle_looks = busy ? 0 : idle_looks + 1;
    if (idle_looks < kWatchdogIdleLooks) continue;
    idle_looks = 0;
    watchdog_parked.store(true, std::memory_order_seq_cst);
    // A call that entered before it could see `parked`: look again before sleeping.
    bool entered_meanwhile = false;
    {
      std::lock_guard<std::mutex> lock(WatchedMutex());
      for (WatchedThread* thread : Watched()) {
        if (thread->inside.load(std::memory_order_seq_cst) ||
            thread->entered.load(std::memory_order_relaxed) != thread->seen) {
          entered_meanwhile = true;
        }
      }
    }
    std::unique_lock<std::mutex> lock(WatchdogParkMutex());
    if (entered_meanwhile) {
      watchdog_parked.store(false, std::memory_order_seq_cst);
      continue;
    }
    WatchdogWake().wait(lock, [] { return !watchdog_parked.load(std::memory_order_seq_cst); });
  }
}

void InterruptOnly(int) {}

void StartWatchdogOnce() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = InterruptOnly;
    sigemptyset(&action.sa_mask);
    action.sa_flags = SA_RESTART;  // (the linger wait checks for a pending signal, restart or not)
    sigaction(kWatchdogSignal, &action, nullptr);
    std::thread(WatchdogLoop).detach();
    watchdog_on.store(true, std::memory_order_relaxed);
  });
}

class Poller;

// ---------------------------------------------------------------------------------------------------------------
// Per-environment state (instance data) and the exported functions

// ---------------------------------------------------------------------------------------------------------------
// Connect guard (daemon/connect-guard.ts says why): cgroup BPF programs on connect4/connect6 that refuse connect()
// on any socket registered in a socket-storage map, whoever calls it. A hook of the cgroup a socket was created in
// runs for it, so programs on the daemon's cgroup see a client's connect() of a copy of a lent socket. The map's
// entries live on the sockets themselves (BPF_MAP_TYPE_SK_STORAGE) and go with them: no size, no eviction.
//
// Process-wide, not per environment: the daemon's connects run on its main thread and the warm TLS relays' loopback
// pairs on theirs, all registered in one map. The map, the programs and their links are the process's until it
// exits: the links' fds are never closed here, and their end with the process detaches the programs.

std::atomic<int> g_guard_map{-1};

uint64_t PointerBits(const void* pointer) { return static_cast<uint64_t>(reinterpret_cast<uintptr_t>(pointer)); }

long Bpf(int command, bpf_attr* attr) { return ::syscall(SYS_bpf, command, attr, sizeof *attr); }

// Registers `fd` with the guard, if there is one: from now on every connect() of that socket fails with EPERM.
// Returns 0 or an errno. Called once the daemon's own connect() has started (or, for a pair's accepted end and a
// socket from the fd store, at once). `seen`: the socket's own connect() has just run, so the guard's program made
// its storage if the program covers it (a socket created in the cgroup it is attached to, or below): only such a
// socket is registered (BPF_EXIST), and ENOENT says the program did not see its connect, so no registration could
// make the kernel refuse the next (the daemon was moved to another cgroup since the guard started): the socket is
// left as it is, and GuardCovers says so.
int GuardSocket(int fd, bool seen = false) {
  const int map = g_guard_map.load(std::memory_order_acquire);
  if (map < 0) return 0;
  bpf_attr attr;
  memset(&attr, 0, sizeof attr);
  const int key = fd;
  const uint32_t value = 1;
  attr.map_fd = static_cast<uint32_t>(map);
  attr.key = PointerBits(&key);
  attr.value = PointerBits(&value);
  attr.flags = seen ? BPF_EXIST : BPF_ANY;
  if (Bpf(BPF_MAP_UPDATE_ELEM, &attr) == 0) return 0;
  return seen && errno == ENOENT ? 0 : errno;
}

// Whether the kernel refuses every connect() of `fd` from now on: registered, which for a socket the daemon
// connected (GuardSocket's `seen`) also says the guard's program ran for its connect. No guard: false.
bool GuardCovers(int fd) {
  const int map = g_guard_map.load(std::memory_order_acquire);
  if (map < 0) return false;
  bpf_attr attr;
  memset(&attr, 0, sizeof attr);
  const int key = fd;
  uint32_t value = 0;
  attr.map_fd = static_cast<uint32_t>(map);
  attr.key = PointerBits(&key);
  attr.value = PointerBits(&value);
  return Bpf(BPF_MAP_LOOKUP_ELEM, &attr) == 0 && value != 0;
}

// The guard's program, the same for connect4 and connect6 (attach types differ, code does not):
//   sk = ctx->sk; if (!sk) return 1;
//   registered = bpf_sk_storage_get(map, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
//   if (registered && *registered) return 0 /* EPERM */; return 1;
// The storage it creates (0: seen, not registered) tells GuardSocket that the program covers the socket; it goes
// with the socket like a registration.
std::vector<bpf_insn> GuardProgram(int map_fd) {
  auto insn = [](uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm) {
    bpf_insn i;
    memset(&i, 0, sizeof i);
    i.code = code;
    i.dst_reg = dst & 0xf;
    i.src_reg = src & 0xf;
    i.off = off;
    i.imm = imm;
    return i;
  };
  return {
      insn(BPF_LDX | BPF_MEM | BPF_DW, BPF_REG_2, BPF_REG_1, offsetof(bpf_sock_addr, sk), 0),
      insn(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_2, 0, 10, 0),  // no socket: allow
      insn(BPF_LD | BPF_DW | BPF_IMM, BPF_REG_1, BPF_PSEUDO_MAP_FD, 0, map_fd),
      insn(0, 0, 0, 0, 0),
      insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_3, 0, 0, 0),
      insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_4, 0, 0, BPF_SK_STORAGE_GET_F_CREATE),
      insn(BPF_JMP | BPF_CALL, 0, 0, 0, BPF_FUNC_sk_storage_get),
      insn(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_0, 0, 4, 0),  // no storage (out of memory): allow
      insn(BPF_LDX | BPF_MEM | BPF_W, BPF_REG_1, BPF_REG_0, 0, 0),
      insn(BPF_JMP | BPF_JEQ | BPF_K, BPF_REG_1, 0, 2, 0),  // seen, not registered: allow
      insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 0),
      insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
      insn(BPF_ALU64 | BPF_MOV | BPF_K, BPF_REG_0, 0, 0, 1),
      insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0),
  };
}

// A socket-storage map must name its key and value types in BTF: one type, a 4-byte signed int, serves both.
std::vector<uint8_t> GuardBtf() {
  const char strings[] = "\0int";  // offset 1: "int"
  struct {
    btf_type type;
    uint32_t encoding;
  } types;
  memset(&types, 0, sizeof types);
  types.type.name_off = 1;
  types.type.info = BTF_KIND_INT << 24;
  types.type.size = 4;
  types.encoding = (BTF_INT_SIGNED << 24) | 32;
  btf_header header;
  memset(&header, 0, sizeof header);
  header.magic = BTF_MAGIC;
  header.version = BTF_VERSION;
  header.hdr_len = sizeof header;
  header.type_off = 0;
  header.type_len = sizeof types;
  header.str_off = sizeof types;
  header.str_len = sizeof strings;
  std::vector<uint8_t> blob(sizeof header + sizeof types + sizeof strings);
  memcpy(blob.data(), &header, sizeof header);
  memcpy(blob.data() + sizeof header, &types, sizeof types);
  memcpy(blob.data() + sizeof header + sizeof types, strings, sizeof strings);
  return blob;
}

// GuardSocket, or the error thrown where a socket the guard must cover could not be registered.
void GuardSocketOrThrow(Napi::Env env, int fd, bool seen = false) {
  const int err = GuardSocket(fd, seen);
  if (err != 0) ThrowErrno(env, err, "bpf", "BPF_MAP_UPDATE_ELEM (connect guard)");
}

// Lets in only segments from `from`: a classic BPF socket filter, for a listener, attached before listen() so that
// no SYN from anyone else ever takes a place in its queues (see LoopbackPairListen). When tcp_filter() runs it, on
// a listener as on any TCP socket, the packet's data starts at the TCP header (the source port at offset 0) and the
// IPv4 header is at SKF_NET_OFF (the source address at 12); test/loopback-pair.test.ts proves both, with our own
// connection let in and strangers' left unanswered. The kernel compiles (JITs) each filter attached, which costs
// more CPU than the rest of a loopback pair together (docs/benchmarks.md, twenty-second session). Returns 0, or the
// errno of a refusal: some kernels (this project's CI machine's) refuse socket filters to a process without
// CAP_NET_ADMIN with EPERM, and sockpoold drops that capability once its connect guard is up.
int AttachSourceFilter(int fd, const sockaddr_in& from) {
  sock_filter code[] = {
      BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 0),  // the TCP source port
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ntohs(from.sin_port), 0, 3),
      BPF_STMT(BPF_LD | BPF_W | BPF_ABS, static_cast<uint32_t>(SKF_NET_OFF + 12)),  // the IPv4 source address
      BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ntohl(from.sin_addr.s_addr), 0, 1),
      BPF_STMT(BPF_RET | BPF_K, 0xffffffff),  // the whole segment
      BPF_STMT(BPF_RET | BPF_K, 0),           // dropped
  };
  const sock_fprog program = {static_cast<unsigned short>(sizeof code / sizeof code[0]), code};
  return ::setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &program, sizeof program) < 0 ? errno : 0;
}

// A TCP listener on 127.0.0.1, port chosen by the kernel (`address` says which); `flags`: SOCK_NONBLOCK or 0 (with
// SOCK_CLOEXEC always). With `only_from`, it lets in connections from that address and port alone
// (AttachSourceFilter), or, where the kernel refuses the filter with EPERM, it is left unfiltered and *filter_refused
// says so (any other refusal throws). The caller owns the fd.
int ListenOnLoopback(Napi::Env env, int flags, int backlog, sockaddr_in* address,
                     const sockaddr_in* only_from = nullptr, bool* filter_refused = nullptr) {
  FdGuard listener(::socket(AF_INET, SOCK_STREAM | flags | SOCK_CLOEXEC, 0));
  if (listener.get() < 0) ThrowErrno(env, errno, "socket");
  if (only_from != nullptr) {
    const int refused = AttachSourceFilter(listener.get(), *only_from);
    if (refused != 0 && (refused != EPERM || filter_refused == nullptr)) {
      ThrowErrno(env, refused, "setsockopt", "SO_ATTACH_FILTER");
    }
    if (filter_refused != nullptr) *filter_refused = refused != 0;
  }
  memset(address, 0, sizeof *address);
  address->sin_family = AF_INET;
  address->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof *address;
  if (::bind(listener.get(), reinterpret_cast<sockaddr*>(address), length) < 0) ThrowErrno(env, errno, "bind");
  if (::listen(listener.get(), backlog) < 0) ThrowErrno(env, errno, "listen");
  if (::getsockname(listener.get(), reinterpret_cast<sockaddr*>(address), &length) < 0) {
    ThrowErrno(env, errno, "getsockname");
  }
  return listener.release();
}

// What SO_SNDBUF and SO_RCVBUF ask for on each end of a loopback pair (the kernel doubles it for its bookkeeping):
// under net.core.wmem_max/rmem_max's default (212,992), which caps what a process without CAP_NET_ADMIN may ask, so
// every host gets the same.
constexpr int kLoopbackPairBufferBytes = 128 * 1024;

// Fixes a loopback pair end's buffers (on a listener: the end it accepts inherits them) before its connection is
// made, so that its window is offered from the fixed size. A pair's sockets are the daemon's, and the kernel charges
// their buffers to the daemon's cgroup whoever holds them: left to autotuning, a lent session whose client reads
// nothing held megabytes on its pair (the relay's end's send buffer grows to tcp_wmem's most), up to
// maxLeasesPerUid of them a uid. Setting a size locks it (no autotuning); over loopback, whose round trip is µs, this
// size carries far more than a relay thread's TLS. The client may raise its own end's, as far as
// net.core.rmem_max/wmem_max allow a process without CAP_NET_ADMIN (docs/security.md).
void FixLoopbackPairBuffers(Napi::Env env, int fd) {
  const int bytes = kLoopbackPairBufferBytes;
  if (::setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) < 0) {
    ThrowErrno(env, errno, "setsockopt", "SO_SNDBUF");
  }
  if (::setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof bytes) < 0) {
    ThrowErrno(env, errno, "setsockopt", "SO_RCVBUF");
  }
}

// A loopback pair's first half (see LoopbackPairListen): *listener listening on 127.0.0.1:<ephemeral> and *client
// a socket not yet connected, each closing what it held before. `filtered`: the client is bound to 127.0.0.1:0
// first, so that its port is known before the listener exists, and the listener lets in that address alone.
// Returns whether the listener is filtered: not when the kernel refused the filter (EPERM, see AttachSourceFilter);
// then its queue is as long as the kernel allows instead, so that a sprayer has to land thousands of connections in
// the few µs before ours to fill it (the wait takes strangers out of it until ours arrives).
bool StartLoopbackPair(Napi::Env env, bool filtered, FdGuard* listener, FdGuard* client) {
  listener->reset(-1);
  client->reset(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (client->get() < 0) ThrowErrno(env, errno, "socket");
  FixLoopbackPairBuffers(env, client->get());
  if (!filtered) {
    sockaddr_in address;
    listener->reset(ListenOnLoopback(env, SOCK_NONBLOCK, 8, &address));
    FixLoopbackPairBuffers(env, listener->get());
    return false;
  }
  sockaddr_in from;
  memset(&from, 0, sizeof from);
  from.sin_family = AF_INET;
  from.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t length = sizeof from;
  if (::bind(client->get(), reinterpret_cast<sockaddr*>(&from), length) < 0) ThrowErrno(env, errno, "bind");
  if (::getsockname(client->get(), reinterpret_cast<sockaddr*>(&from), &length) < 0) {
    ThrowErrno(env, errno, "getsockname");
  }
  sockaddr_in address;
  bool refused = false;
  FdGuard filtered_listener(ListenOnLoopback(env, SOCK_NONBLOCK, 8, &address, &from, &refused));
  if (!refused) {
    listener->reset(filtered_listener.release());
    FixLoopbackPairBuffers(env, listener->get());
    return true;
  }
  filtered_listener.reset(-1);
  listener->reset(ListenOnLoopback(env, SOCK_NONBLOCK, SOMAXCONN, &address));
  FixLoopbackPairBuffers(env, listener->get());
  return false;
}

// How many strangers' connections loopbackPairTry and loopbackPairAccept take out of a listener's queue in one call
// (each an accept4 and a close, a few µs): an unfiltered listener's queue holds thousands, and the relay thread that
// sweeps it has other sessions to relay in between.
constexpr int kLoopbackPairSweep = 64;

// Connects `client` (non-blocking) to `listener`. Over loopback the kernel runs the whole handshake within connect()
// (see LoopbackPairListen), so our connection is queued on return unless the queue was full.
void ConnectToListener(Napi::Env env, int listener, int client) {
  sockaddr_in address;
  socklen_t length = sizeof address;
  if (::getsockname(listener, reinterpret_cast<sockaddr*>(&address), &length) < 0) {
    ThrowErrno(env, errno, "getsockname");
  }
  int result;
  do {
    result = ::connect(client, reinterpret_cast<sockaddr*>(&address), length);
  } while (result < 0 && errno == EINTR);
  if (result < 0 && errno != EINPROGRESS) ThrowErrno(env, errno, "connect");
}

// Accepts from `listener` until it finds the connection whose peer is `client`: the accepted fd (the caller's), or -1
// when ours is not there within `wait_ms` (0: never waits), or, with `budget` > 0, once that many strangers were taken
// out without finding ours (the queue may hold more: a caller on an event loop comes back when it is readable again).
// Connections from anyone else are accepted and closed (never returned), which also makes room in the queue for ours.
int AcceptOurs(Napi::Env env, int listener, int client, int wait_ms, int budget = 0) {
  sockaddr_in mine;
  socklen_t mine_length = sizeof mine;
  if (::getsockname(client, reinterpret_cast<sockaddr*>(&mine), &mine_length) < 0) {
    ThrowErrno(env, errno, "getsockname");
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(wait_ms);
  for (int taken = 0;;) {
    sockaddr_in peer;
    socklen_t peer_length = sizeof peer;
    const int accepted =
        ::accept4(listener, reinterpret_cast<sockaddr*>(&peer), &peer_length, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (accepted >= 0) {
      if (peer.sin_port == mine.sin_port && peer.sin_addr.s_addr == mine.sin_addr.s_addr) return accepted;
      CloseQuietly(accepted);  // a stranger's
      if (budget > 0 && ++taken >= budget) return -1;
      continue;
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;  // ECONNABORTED: a connection gone before its accept
    if (errno != EAGAIN && errno != EWOULDBLOCK) ThrowErrno(env, errno, "accept4");
    const auto remaining =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (remaining <= 0) return -1;
    pollfd ready = {listener, POLLIN, 0};
    if (::poll(&ready, 1, static_cast<int>(remaining)) < 0 && errno != EINTR) ThrowErrno(env, errno, "poll");
  }
}

// A loopback pair's two ends made ready to hand out: TCP_NODELAY on both, both registered with the connect guard
// (either end may be lent: neither may connect again). Returns [accepted end, connecting end]; the caller releases
// its guards of both once this returned (a throw leaves them the caller's).
Napi::Array FinishLoopbackPair(Napi::Env env, int server, int client) {
  const int on = 1;
  ::setsockopt(server, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  ::setsockopt(client, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
  Napi::Array pair = Napi::Array::New(env, 2);
  pair.Set(0u, Napi::Number::New(env, server));
  pair.Set(1u, Napi::Number::New(env, client));
  for (const int end : {server, client}) GuardSocketOrThrow(env, end);
  return pair;
}

// The guard checked by the kernel itself: a loopback connection, registered, disconnected (connect() with
// AF_UNSPEC, as a client would through its copy) and connected again. Returns that last connect's errno: EPERM is
// the guard at work, 0 means it let the connect through.
int GuardSelfCheck(Napi::Env env) {
  sockaddr_in address;
  FdGuard listener(ListenOnLoopback(env, 0, 4, &address));
  const socklen_t length = sizeof address;
  FdGuard probe(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (probe.get() < 0) ThrowErrno(env, errno, "socket");
  if (::connect(probe.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) ThrowErrno(env, errno, "connect");
  GuardSocketOrThrow(env, probe.get(), true);
  sockaddr unspecified;
  memset(&unspecified, 0, sizeof unspecified);
  unspecified.sa_family = AF_UNSPEC;
  if (::connect(probe.get(), &unspecified, sizeof unspecified) < 0) ThrowErrno(env, errno, "connect", "AF_UNSPEC");
  return ::connect(probe.get(), reinterpret_cast<sockaddr*>(&address), length) == 0 ? 0 : errno;
}


// ---------------------------------------------------------------------------------------------------------------
// The kernel's local routes, through rtnetlink (daemon/host-addresses.ts says why it wants them): one RTM_GETROUTE
// dump per family, asking the kernel for the routes of type RTN_LOCAL only (of one table, or of every table), so that
// a host whose routing table holds thousands or a million routes does not send them all here to be skipped. The
// kernel filters a dump by the request's rtm_type and table only when the socket asked for strict checking
// (NETLINK_GET_STRICT_CHK, Linux 4.20; ip_valid_fib_dump_req): before, the whole table comes, and is filtered below,
// as every reply is anyway (type, family, table), in case a kernel ignores part of the request.

constexpr int kNetlinkGetStrictChk = 12;  // NETLINK_GET_STRICT_CHK (linux/netlink.h, Linux 4.20)
// A host holds one local route per address, and per AnyIP range: a family's list longer than this is refused (E2BIG)
// rather than built into as many JavaScript objects.
constexpr size_t kMaxLocalRoutes = 262144;
// Larger than any part of a dump: the kernel's parts are at most 32 KiB (netlink_dump, max_recvmsg_len).
constexpr size_t kNetlinkReceiveBytes = 64 * 1024;
// A dump that a change of the table interrupted (NLM_F_DUMP_INTR) is done again, at most this many times in all.
constexpr int kRouteDumpAttempts = 3;
// The kernel answers a dump while recv() waits for the next part, never later: the timeout only bounds a kernel that
// would not.
constexpr int kNetlinkReceiveTimeoutMs = 1000;

struct LocalRoute {
  int family;  // AF_INET or AF_INET6
  uint8_t address[16];
  int prefix_length;
  uint32_t table;
};

// The routes of type RTN_LOCAL of `family`, of `table` (0: every table), appended to `routes`; `received` counts
// the route messages the kernel sent (what its filter let through). Throws the syscall's error, EBADMSG for a
// reply it cannot read, E2BIG past kMaxLocalRoutes, EAGAIN when every attempt was interrupted. `fd`: a
// NETLINK_ROUTE socket, `sequence` its last request's number.
void DumpLocalRoutes(Napi::Env env, int fd, int family, uint32_t table, uint32_t* sequence,
                     std::vector<LocalRoute>* routes, size_t* received) {
  const size_t first = routes->size();
  std::vector<uint32_t> buffer(kNetlinkReceiveBytes / sizeof(uint32_t));  // nlmsghdr's 4-byte alignment
  for (int attempt = 0; attempt < kRouteDumpAttempts; attempt++) {
    routes->resize(first);
    size_t messages = 0;
    struct {
      nlmsghdr header;
      rtmsg route;
      rtattr table_attribute;
      uint32_t table;
    } request;
    memset(&request, 0, sizeof request);
    request.header.nlmsg_len = NLMSG_LENGTH(sizeof request.route);
    request.header.nlmsg_type = RTM_GETROUTE;
    request.header.nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP;
    request.header.nlmsg_seq = ++*sequence;
    request.route.rtm_family = static_cast<unsigned char>(family);
    request.route.rtm_type = RTN_LOCAL;
    if (table != RT_TABLE_UNSPEC) {
      // rtm_table holds 8 bits; RTA_TABLE, which the kernel prefers, any table.
      const uint32_t header_table = table < 256 ? table : static_cast<uint32_t>(RT_TABLE_COMPAT);
      request.route.rtm_table = static_cast<unsigned char>(header_table);
      request.table_attribute.rta_type = RTA_TABLE;
      request.table_attribute.rta_len = RTA_LENGTH(sizeof request.table);
      request.table = table;
      request.header.nlmsg_len = NLMSG_ALIGN(request.header.nlmsg_len) + RTA_ALIGN(request.table_attribute.rta_len);
    }
    sockaddr_nl kernel;
    memset(&kernel, 0, sizeof kernel);
    kernel.nl_family = AF_NETLINK;
    ssize_t sent;
    do {
      sent = ::sendto(fd, &request, request.header.nlmsg_len, 0, reinterpret_cast<sockaddr*>(&kernel), sizeof kernel);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) ThrowErrno(env, errno, "sendto", "RTM_GETROUTE");
    bool done = false;
    bool interrupted = false;
    while (!done) {
      iovec part = {buffer.data(), kNetlinkReceiveBytes};
      sockaddr_nl sender;
      memset(&sender, 0, sizeof sender);
      msghdr message;
      memset(&message, 0, sizeof message);
      message.msg_name = &sender;
      message.msg_namelen = sizeof sender;
      message.msg_iov = &part;
      message.msg_iovlen = 1;
      ssize_t length;
      do {
        // MSG_TRUNC: the part's real length, so that one longer than the buffer is seen rather than read cut.
        length = ::recvmsg(fd, &message, MSG_TRUNC);
      } while (length < 0 && errno == EINTR);
      if (length < 0) ThrowErrno(env, errno, "recvmsg", "RTM_GETROUTE");
      if ((message.msg_flags & MSG_TRUNC) != 0 || static_cast<size_t>(length) > kNetlinkReceiveBytes) {
        ThrowErrno(env, EMSGSIZE, "recvmsg", "RTM_GETROUTE: a part of " + std::to_string(length) + " bytes");
      }
      // Only the kernel's parts (port 0): any process may send to this socket's port, and a forged part could end
      // the dump early, or add routes.
      if (message.msg_namelen != sizeof sender || sender.nl_pid != 0) continue;
      int left = static_cast<int>(length);
      const nlmsghdr* header = reinterpret_cast<const nlmsghdr*>(buffer.data());
      for (; !done && NLMSG_OK(header, left); header = NLMSG_NEXT(header, left)) {
        if (header->nlmsg_seq != *sequence) continue;  // an answer to an earlier, abandoned request
        if ((header->nlmsg_flags & NLM_F_DUMP_INTR) != 0) interrupted = true;
        if (header->nlmsg_type == NLMSG_DONE) {
          // The dump's own error, if it ended on one (netlink_dump_done).
          if (header->nlmsg_len >= NLMSG_LENGTH(sizeof(int))) {
            int error;
            memcpy(&error, NLMSG_DATA(header), sizeof error);
            if (error < 0) ThrowErrno(env, -error, "recvmsg", "RTM_GETROUTE");
          }
          done = true;
          break;
        }
        if (header->nlmsg_type == NLMSG_ERROR) {
          if (header->nlmsg_len < NLMSG_LENGTH(sizeof(nlmsgerr))) {
            ThrowErrno(env, EBADMSG, "recvmsg", "RTM_GETROUTE: NLMSG_ERROR");
          }
          nlmsgerr error;
          memcpy(&error, NLMSG_DATA(header), sizeof error);
          ThrowErrno(env, error.error < 0 ? -error.error : EPROTO, "recvmsg", "RTM_GETROUTE");
        }
        if (header->nlmsg_type != RTM_NEWROUTE) continue;
        if (header->nlmsg_len < NLMSG_LENGTH(sizeof(rtmsg))) ThrowErrno(env, EBADMSG, "recvmsg", "RTM_GETROUTE");
        messages++;
        const auto* route = static_cast<const rtmsg*>(NLMSG_DATA(header));
        const size_t address_bytes = family == AF_INET ? 4 : 16;
        // Another family's routes come when the kernel has no handler for this one (IPv6 disabled at boot: the
        // request falls to the dump of every family).
        if (route->rtm_family != family || route->rtm_type != RTN_LOCAL || route->rtm_dst_len > address_bytes * 8) {
          continue;
        }
        LocalRoute local;
        memset(&local, 0, sizeof local);
        local.family = family;
        local.prefix_length = route->rtm_dst_len;
        local.table = route->rtm_table;
        int attributes_left = static_cast<int>(RTM_PAYLOAD(header));
        for (const rtattr* attribute = RTM_RTA(route); RTA_OK(attribute, attributes_left);
             attribute = RTA_NEXT(attribute, attributes_left)) {
          if (attribute->rta_type == RTA_TABLE && RTA_PAYLOAD(attribute) == sizeof(uint32_t)) {
            memcpy(&local.table, RTA_DATA(attribute), sizeof local.table);
          } else if (attribute->rta_type == RTA_DST) {
            if (RTA_PAYLOAD(attribute) != address_bytes) {
              ThrowErrno(env, EBADMSG, "recvmsg", "RTM_GETROUTE: RTA_DST");
            }
            memcpy(local.address, RTA_DATA(attribute), address_bytes);
          }
        }
        if (table != RT_TABLE_UNSPEC && local.table != table) continue;  // a kernel that ignored the table asked
        if (routes->size() - first >= kMaxLocalRoutes) {
          ThrowErrno(env, E2BIG, "recvmsg",
                     "RTM_GETROUTE: more than " + std::to_string(kMaxLocalRoutes) + " local routes");
        }
        routes->push_back(local);
      }
      // A message cut short inside a part: the part cannot be read further, nor the dump trusted.
      if (!done && left != 0) ThrowErrno(env, EBADMSG, "recvmsg", "RTM_GETROUTE: a truncated message");
    }
    *received += messages;
    if (!interrupted) return;
  }
  ThrowErrno(env, EAGAIN, "recvmsg", "RTM_GETROUTE: every dump was interrupted by a change of the routes");
}

class SockpoolAddon : public Napi::Addon<SockpoolAddon> {
 public:
  SockpoolAddon(Napi::Env env, Napi::Object exports);

  // Environment teardown (instance-data finalizer): close every received fd this thread still owns. Pollers
  // were closed earlier by their own async cleanup hooks, so no fd is closed while libuv still watches it.
  ~SockpoolAddon() {
    for (const int fd : tracked_) CloseQuietly(fd);
  }

  const std::shared_ptr<FdSet>& polled() const { return polled_; }

 private:
  // Received fds this environment owns (see recvMessage, close, untrack).
  FdSet tracked_;
  // Fds watched by this environment's open Pollers; shared with them because a Poller may outlive this object
  // by a few callbacks during teardown.
  std::shared_ptr<FdSet> polled_ = std::make_shared<FdSet>();
  // recvMessage's and recvMessages' landing buffers (grown to the largest request).
  std::vector<uint8_t> recv_buffer_;
  std::vector<uint64_t> recv_control_;
  // tcpInfoScratch's array (SetTcpInfoScratch): referenced for as long as the addon may write it.
  Napi::ObjectReference tcp_scratch_ref_;
  double* tcp_scratch_ = nullptr;

  // -- AF_UNIX

  Napi::Value SeqpacketListen(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = StringArg(info, 0, "path");
    const int backlog = static_cast<int>(IntegerArg(info, 1, "backlog", 0, INT32_MAX));
    const bool refuse_fds = !IsAbsent(info, 2) && BoolArg(info, 2, "refuseFds");
    sockaddr_un address;
    const socklen_t length = UnixAddress(env, path, &address, "bind");
    FdGuard socket(SocketOrThrow(env, AF_UNIX, SOCK_SEQPACKET));
    // Before the socket can take a connection, so none can queue a message with fds (see RefuseFdPassing); a kernel
    // without the option (ENOPROTOOPT) is the caller's to learn from refuseFdPassing.
    const int off = 0;
    if (refuse_fds && ::setsockopt(socket.get(), SOL_SOCKET, kSoPassRights, &off, sizeof off) < 0 && errno != ENOPROTOOPT) {
      ThrowErrno(env, errno, "setsockopt", "SO_PASSRIGHTS");
    }
    if (::bind(socket.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) {
      ThrowErrno(env, errno, "bind", path);
    }
    if (::listen(socket.get(), backlog) < 0) ThrowErrno(env, errno, "listen", path);
    return Napi::Number::New(env, socket.release());  // ownership passes to the caller
  }

  Napi::Value SeqpacketConnect(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = StringArg(info, 0, "path");
    sockaddr_un address;
    const socklen_t length = UnixAddress(env, path, &address, "connect");
    FdGuard socket(SocketOrThrow(env, AF_UNIX, SOCK_SEQPACKET));
    int result;
    do {
      result = ::connect(socket.get(), reinterpret_cast<sockaddr*>(&address), length);
    } while (result < 0 && errno == EINTR);
    // A unix connect completes at once or fails (EAGAIN when the listener's backlog is full).
    if (result < 0) ThrowErrno(env, errno, "connect", path);
    return Napi::Number::New(env, socket.release());  // ownership passes to the caller
  }

  Napi::Value SeqpacketPair(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int fds[2];
    if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) < 0) {
      ThrowErrno(env, errno, "socketpair");
    }
    FdGuard first(fds[0]);
    FdGuard second(fds[1]);
    Napi::Array result = Napi::Array::New(env, 2);
    result.Set(0u, Napi::Number::New(env, fds[0]));
    result.Set(1u, Napi::Number::New(env, fds[1]));
    first.release();  // ownership of both passes to the caller
    second.release();
    return result;
  }

  // A connected pair of TCP sockets over 127.0.0.1, both non-blocking, TCP_NODELAY, made in two calls:
  // loopbackPairListen() then loopbackPairTry() (shared/native.ts, startLoopbackPair). The daemon's warm TLS relay
  // keeps the accepted end and hands out the connecting one. A TCP socket, not a Unix socketpair, because curl
  // 7.88 calls connect() again on a socket it is told is already connected: a TCP socket whose non-blocking
  // connect nobody completed answers 0 (as the daemon's own TCP sockets do), a Unix one EISCONN or EINVAL.
  //
  // Any local user can connect to any 127.0.0.1 port, the pair's listener included (it lives a few µs, but
  // /proc/net/tcp lists it, and a thread preempted between listen() and connect() gives a sprayer milliseconds).
  // A stranger's connection is never returned (ours is the one whose peer is our client), but strangers queued
  // before ours could make the pair fail, or fill the listener's queue so that our SYN is dropped and waits a
  // second for its retransmit while this thread sits blocked. So a pair is made in at most two attempts:
  // - The first, unfiltered, never waits. Over loopback the kernel runs the whole handshake within connect()
  //   (the SYN, SYN-ACK and ACK go through the loopback device's softirq before connect() returns), so our
  //   connection is already queued, and first unless a stranger landed in the few µs before our connect.
  // - If the first connection the listener has is not ours, or there is none, both are closed and the pair is
  //   made again with a socket filter on the listener (AttachSourceFilter) that lets in only segments from our
  //   client's address and port, bound before the listener exists: no other user can send from that port, nor
  //   take a place in the queue, so the only connection it can have is ours. Its wait (a second) is for our own
  //   handshake alone (a softirq run late), out of a stranger's reach.
  // - Where the kernel refuses the filter (EPERM without CAP_NET_ADMIN on some kernels, and sockpoold drops it),
  //   the second listener is unfiltered with the longest queue the kernel allows, and its wait takes strangers out
  //   of the queue until ours arrives, for up to 3 s (our SYN's first retransmit, should a sprayer have filled even
  //   that queue, comes after 1 s). A sprayer can then still delay a pair, not make it fail; both attempts close
  //   every stranger they meet.
  // - The two attempts are shared/native.ts's startLoopbackPair (loopbackPairListen and loopbackPairTry, twice),
  //   which never waits. Who waits for a pair whose connection was not there after the second: the relay thread, which
  //   relays many clients' sessions and must not stall them all for one pair, on its event loop (a Poller on the
  //   listener, loopbackPairAccept at each readiness, a timer for the bound: daemon/loopback-pair.ts); native
  //   loopbackPair, blocking its thread, in loopbackPairAwait (kernel-tls.ts's probe at start-up, tests).
  // Why not always the filter, the simplest: the kernel compiles each filter attached, which costs more CPU than
  // the rest of the pair (docs/benchmarks.md, twenty-second session). Not a listener at a random 127.0.0.0/8
  // address: /proc/net/tcp and inet_diag show it to everyone. Not SO_LOCK_FILTER: nobody but this code ever holds
  // the listener. The accepted end inherits the filter, which passes exactly what its peer sends.

  // [listener, client, filtered], a loopback pair's first half (StartLoopbackPair). `filtered`: the first attempt is
  // unfiltered, the second filtered where the kernel allows; the third element says whether the listener is. Both fds
  // belong to the caller, who passes both to loopbackPairTry.
  Napi::Value LoopbackPairListen(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const bool filter = !IsAbsent(info, 0) && BoolArg(info, 0, "filtered");
    FdGuard listener(-1);
    FdGuard client(-1);
    const bool filtered = StartLoopbackPair(env, filter, &listener, &client);
    Napi::Array result = Napi::Array::New(env, 3);
    result.Set(0u, Napi::Number::New(env, listener.get()));
    result.Set(1u, Napi::Number::New(env, client.get()));
    result.Set(2u, Napi::Boolean::New(env, filtered));
    listener.release();  // ownership of both passes to the caller
    client.release();
    return result;
  }

  // The blocking end of a wait for our own connection, after a loopbackPairTry that returned null (shared/native.ts
  // loopbackPair: kernel-tls.ts's one-off probe at start-up, tests; never the relay thread, see above): takes the
  // listener and client, and owns both whatever happens (the listener is closed before this returns, the client
  // returned in the pair or closed). Waits up to `waitMs` with this thread blocked, closing strangers' connections as
  // they come. Returns [accepted end, connecting end], or throws ETIMEDOUT.
  Napi::Value LoopbackPairAwait(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int listener_fd = FdArg(info, 0);
    const int client_fd = FdArg(info, 1);
    FdGuard listener(listener_fd);
    FdGuard client(client_fd);
    // Untracked as soon as they are ours (loopbackPairTry tracked both when it returned null): a throw from here on
    // closes them, and a number left tracked would be closed again at teardown, by then maybe another fd's.
    tracked_.erase(listener_fd);
    tracked_.erase(client_fd);
    const int wait_ms = static_cast<int>(IntegerArg(info, 2, "waitMs", 0, 60000));
    FdGuard server(AcceptOurs(env, listener.get(), client.get(), wait_ms));
    if (server.get() < 0) ThrowErrno(env, ETIMEDOUT, "accept4", "loopback pair: our own connection never arrived");
    Napi::Array pair = FinishLoopbackPair(env, server.get(), client.get());
    server.release();  // ownership of both passes to the caller; the listener closes here
    client.release();
    return pair;
  }

  // One attempt that never waits, for a caller on an event loop (daemon/loopback-pair.ts): connects the client to the
  // listener and looks once for our connection, taking out (closing) up to kLoopbackPairSweep strangers on the way.
  // Returns [accepted end, connecting end], the listener closed, or null when ours is not there yet. Owns both fds
  // whatever happens (closes them if it throws) except when it returns null: then both are the caller's again, and
  // tracked by this thread (its teardown closes them) until the caller closes or untracks them, so that a thread
  // ended while it waits for ours leaves nothing open.
  Napi::Value LoopbackPairTry(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    FdGuard listener(FdArg(info, 0));
    FdGuard client(FdArg(info, 1));
    ConnectToListener(env, listener.get(), client.get());
    FdGuard server(AcceptOurs(env, listener.get(), client.get(), 0, kLoopbackPairSweep));
    if (server.get() < 0) {
      tracked_.insert(listener.release());
      tracked_.insert(client.release());
      return env.Null();
    }
    Napi::Array pair = FinishLoopbackPair(env, server.get(), client.get());
    server.release();  // ownership of both passes to the caller; the listener closes here
    client.release();
    return pair;
  }

  // The wait after a loopbackPairTry that returned null, one look at a time (the caller calls again when the listener
  // is readable): takes out up to kLoopbackPairSweep strangers, never waiting. Returns [accepted end, connecting end]
  // once ours is there (the client, untracked, now the pair's), or null. The listener always stays the caller's, to
  // close after the Poller watching it (close() refuses a watched fd); so does the client, unless it is returned.
  Napi::Value LoopbackPairAccept(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int listener = FdArg(info, 0);
    const int client = FdArg(info, 1);
    FdGuard server(AcceptOurs(env, listener, client, 0, kLoopbackPairSweep));
    if (server.get() < 0) return env.Null();
    Napi::Array pair = FinishLoopbackPair(env, server.get(), client);
    server.release();  // ownership passes to the caller
    tracked_.erase(client);
    return pair;
  }

  Napi::Value Accept(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    for (;;) {
      const int accepted = ::accept4(fd, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (accepted >= 0) return Napi::Number::New(env, accepted);  // ownership passes to the caller
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
      ThrowErrno(env, errno, "accept");
    }
  }

  Napi::Value SendMessage(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const Bytes data = BytesArg(info, 1, "data");
    FdList fds;
    FdListArg(info, 2, &fds);
    iovec vector{data.data, data.length};
    msghdr message;
    memset(&message, 0, sizeof message);
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    RightsBuffer rights;
    AttachRights(&message, &rights, fds);
    ssize_t sent;
    do {
      sent = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
      ThrowErrno(env, errno, "sendmsg");
    }
    // The kernel took its own references to the fds: the caller still owns (and must close) its copies.
    return Napi::Number::New(env, static_cast<double>(sent));
  }

  Napi::Value RecvMessage(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const WatchedCall watched;  // the kernel may drop (and so close) fds here
    const int fd = FdArg(info, 0);
    const size_t max_bytes = static_cast<size_t>(IntegerArg(info, 1, "maxBytes", 0, kMaxMessageBytes));
    const size_t max_fds = static_cast<size_t>(IntegerArg(info, 2, "maxFds", 0, kMaxFdsPerMessage));
    // One buffer per environment, reused: a message is copied out of it before this returns.
    if (recv_buffer_.size() < max_bytes + 1) recv_buffer_.resize(max_bytes + 1);
    uint8_t* data = recv_buffer_.data();
    iovec vector{data, max_bytes};
    // Room for every fd a message can carry (SCM_MAX_FD), whatever maxFds says: an fd that does not fit is dropped
    // by the kernel itself, in this thread and before DisarmLinger could run (see DiscardQuietly), so a client could
    // make this thread wait in the close of a lingering socket by sending one fd more than we take. More than
    // max_fds is refused below, after every fd arrived.
    const size_t control_length = kControlBytes;
    std::vector<uint64_t> control((control_length + sizeof(uint64_t) - 1) / sizeof(uint64_t) + 1, 0);
    msghdr message;
    memset(&message, 0, sizeof message);
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    message.msg_control = control.data();
    message.msg_controllen = control_length;
    ssize_t received;
    do {
      received = ::recvmsg(fd, &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    } while (received < 0 && errno == EINTR);
    if (received < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return env.Null();
      ThrowErrno(env, errno, "recvmsg");
    }
    // From here on the received fds are ours: either tracked and returned, or closed before throwing.
    std::vector<int> fds;
    ForEachReceivedFd(&message, [&fds](int received_fd) { fds.push_back(received_fd); });
    if ((message.msg_flags & MSG_CTRUNC) != 0 || fds.size() > max_fds) {
      for (const int received_fd : fds) DiscardQuietly(received_fd, 0, PeerUid(fd));
      Napi::Error error = CodeError(env, "SOCKPOOL_ERR_FD_TRUNCATED", "recvmsg",
                                    "recvmsg SOCKPOOL_ERR_FD_TRUNCATED: the message carried more than " +
                                        std::to_string(max_fds) + " fds; the " + std::to_string(fds.size()) +
                                        " that arrived were closed");
      error.Set("fdsClosed", Napi::Number::New(env, static_cast<double>(fds.size())));
      throw error;
    }
    if ((message.msg_flags & MSG_TRUNC) != 0) {
      for (const int received_fd : fds) DiscardQuietly(received_fd, 0, PeerUid(fd));
      Napi::Error error = CodeError(env, "SOCKPOOL_ERR_MSG_TRUNCATED", "recvmsg",
                                    "recvmsg SOCKPOOL_ERR_MSG_TRUNCATED: the message was longer than " +
                                        std::to_string(max_bytes) + " bytes; " + std::to_string(fds.size()) +
                                        " fds that came with it were closed");
      error.Set("fdsClosed", Napi::Number::New(env, static_cast<double>(fds.size())));
      throw error;
    }
    // Ownership: the received fds belong to this environment until close() or untrack(); if the thread ends
    // first, ~SockpoolAddon closes them.
    for (const int received_fd : fds) tracked_.insert(received_fd);
    // [data, fds, eof]: an array, not an object, so no property key is looked up per call (the JS wrapper in
    // shared/native.ts names the fields).
    Napi::Array fd_array = Napi::Array::New(env, fds.size());
    for (size_t i = 0; i < fds.size(); i++) fd_array.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
    Napi::Array result = Napi::Array::New(env, 3);
    result.Set(0u, Napi::Buffer<uint8_t>::Copy(env, data, static_cast<size_t>(received)));
    result.Set(1u, fd_array);
    result.Set(2u, Napi::Boolean::New(env, received == 0 && fds.empty() && PeerShutDown(fd)));
    return result;
  }

  // recvmmsg: up to maxCount messages in one syscall (what is queued now; never blocks), straight into the
  // caller's `arena` (message i at i * maxBytes) with what arrived described in `meta` (per message, at
  // i * (3 + maxFds): length, status, fd count, then the fds). Status: kRecvOk, kRecvEof, kRecvFdTruncated (the
  // message carried more than maxFds fds; the fd count says how many arrived, all closed already),
  // kRecvMsgTruncated (longer than maxBytes; its fds closed too). Returns how many entries it wrote, -1 when nothing
  // is waiting. Stops at the first EOF. Received fds are tracked as in recvMessage.
  //
  // No JS object is made here: building a Buffer, an fd array and a result array per message through N-API cost
  // more than the syscall itself on the daemon's hot path; the JS wrapper (shared/native.ts) builds them with
  // plain JS, which V8 allocates inline.
  Napi::Value RecvMessages(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const WatchedCall watched;  // the kernel may drop (and so close) fds here
    const int fd = FdArg(info, 0);
    const size_t max_bytes = static_cast<size_t>(IntegerArg(info, 1, "maxBytes", 1, kMaxMessageBytes));
    const size_t max_fds = static_cast<size_t>(IntegerArg(info, 2, "maxFds", 0, kMaxFdsPerMessage));
    const size_t max_count = static_cast<size_t>(IntegerArg(info, 3, "maxCount", 1, kMaxBatch));
    const Bytes arena = BytesArg(info, 4, "arena");
    TypedArrayView meta_view;
    if (!ReadTypedArray(info, 5, &meta_view) || meta_view.type != napi_int32_array) {
      ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "The \"meta\" argument must be an instance of Int32Array");
    }
    const size_t stride = 3 + max_fds;
    if (arena.length < max_bytes * max_count || meta_view.length < stride * max_count) {
      ThrowRangeError(env, "ERR_OUT_OF_RANGE", "arena or meta too small for maxCount messages");
    }
    int32_t* meta = static_cast<int32_t*>(meta_view.data);
    // Room for SCM_MAX_FD fds per message whatever maxFds says (see recvMessage): none is dropped by the kernel.
    const size_t control_length = kControlBytes;
    const size_t control_words = (control_length + sizeof(uint64_t) - 1) / sizeof(uint64_t) + 1;
    if (recv_control_.size() < control_words * max_count) recv_control_.resize(control_words * max_count);
    iovec vectors[kMaxBatch];
    mmsghdr messages[kMaxBatch];
    memset(messages, 0, sizeof(mmsghdr) * max_count);
    for (size_t i = 0; i < max_count; i++) {
      vectors[i] = {arena.data + i * max_bytes, max_bytes};
      messages[i].msg_hdr.msg_iov = &vectors[i];
      messages[i].msg_hdr.msg_iovlen = 1;
      messages[i].msg_hdr.msg_control = recv_control_.data() + i * control_words;
      messages[i].msg_hdr.msg_controllen = control_length;
    }
    int count;
    do {
      count = ::recvmmsg(fd, messages, static_cast<unsigned int>(max_count), MSG_CMSG_CLOEXEC | MSG_DONTWAIT, nullptr);
    } while (count < 0 && errno == EINTR);
    if (count < 0) {
      if (errno == EAGAIN || errno == EWOULDBLOCK) return Napi::Number::New(env, -1);
      ThrowErrno(env, errno, "recvmmsg");
    }
    // Every fd that arrived is ours from here on: written to meta and tracked, or closed. Nothing below throws.
    int written = 0;
    for (int m = 0; m < count; m++) {
      msghdr& header_set = messages[m].msg_hdr;
      int32_t* entry = meta + static_cast<size_t>(m) * stride;
      int fds[kMaxFdsPerMessage + 2];
      size_t fd_count = 0;
      ForEachReceivedFd(&header_set, [&fds, &fd_count, fd](int received_fd) {
        if (fd_count < sizeof fds / sizeof fds[0]) {
          fds[fd_count++] = received_fd;
        } else {
          // Cannot happen (the control buffer holds fewer), but never leak one.
          DiscardQuietly(received_fd, 0, PeerUid(fd));
        }
      });
      const size_t length = messages[m].msg_len;
      int32_t status = kRecvOk;
      if ((header_set.msg_flags & MSG_CTRUNC) != 0 || fd_count > max_fds) {
        status = kRecvFdTruncated;
      } else if ((header_set.msg_flags & MSG_TRUNC) != 0) {
        status = kRecvMsgTruncated;
      } else if (length == 0 && fd_count == 0 && EndOfStream(fd, messages, m + 1, count)) {
        status = kRecvEof;
      }
      entry[0] = static_cast<int32_t>(length);
      entry[1] = status;
      entry[2] = static_cast<int32_t>(fd_count);
      if (status == kRecvOk) {
        for (size_t i = 0; i < fd_count; i++) {
          tracked_.insert(fds[i]);
          entry[3 + i] = fds[i];
        }
      } else {
        for (size_t i = 0; i < fd_count; i++) DiscardQuietly(fds[i], 0, PeerUid(fd));
      }
      written++;
      if (status == kRecvEof) {
        // recvmmsg fills the remaining slots with the same EOF: the first one says it all. Any fds in later
        // entries cannot exist (EOF carries none), but close whatever came, to be sure nothing leaks.
        for (int rest = m + 1; rest < count; rest++) {
          ForEachReceivedFd(&messages[rest].msg_hdr,
                            [fd](int received_fd) { DiscardQuietly(received_fd, 0, PeerUid(fd)); });
        }
        break;
      }
    }
    return Napi::Number::New(env, written);
  }

  Napi::Value SendDatagram(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = StringArg(info, 0, "path");
    const Bytes data = BytesArg(info, 1, "data");
    FdList fds;
    FdListArg(info, 2, &fds);
    sockaddr_un address;
    const socklen_t length = UnixAddress(env, path, &address, "sendmsg");
    // A fresh socket per datagram, closed before returning (as sd_notify does).
    FdGuard socket(SocketOrThrow(env, AF_UNIX, SOCK_DGRAM));
    iovec vector{data.data, data.length};
    msghdr message;
    memset(&message, 0, sizeof message);
    message.msg_name = &address;
    message.msg_namelen = length;
    message.msg_iov = &vector;
    message.msg_iovlen = 1;
    RightsBuffer rights;
    AttachRights(&message, &rights, fds);
    ssize_t sent;
    do {
      sent = ::sendmsg(socket.get(), &message, MSG_NOSIGNAL | MSG_DONTWAIT);
    } while (sent < 0 && errno == EINTR);
    if (sent < 0) {
      Napi::Error error = ErrnoError(env, errno, "sendmsg", path);
      error.Set("address", Napi::String::New(env, path));
      throw error;
    }
    // The caller keeps (and must close) its copies of fds.
    return env.Undefined();
  }

  Napi::Value DatagramBind(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string path = StringArg(info, 0, "path");
    sockaddr_un address;
    const socklen_t length = UnixAddress(env, path, &address, "bind");
    FdGuard socket(SocketOrThrow(env, AF_UNIX, SOCK_DGRAM));
    SetIntOption(env, socket.get(), SOL_SOCKET, SO_PASSCRED, 0, "SO_PASSCRED");
    if (::bind(socket.get(), reinterpret_cast<sockaddr*>(&address), length) < 0) {
      ThrowErrno(env, errno, "bind", path);
    }
    return Napi::Number::New(env, socket.release());  // ownership passes to the caller
  }

  // -- TCP

  Napi::Value TcpSocket(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int64_t family = IntegerArg(info, 0, "family", 4, 6);
    if (family == 5) ThrowRangeError(env, "ERR_OUT_OF_RANGE", "The value of \"family\" must be 4 or 6");
    return Napi::Number::New(env, SocketOrThrow(env, family == 4 ? AF_INET : AF_INET6, SOCK_STREAM));
  }

  Napi::Value BindAddress(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const std::string address = StringArg(info, 1, "address");
    const int port = static_cast<int>(IntegerArg(info, 2, "port", 0, 65535));
    const InetAddress target = ParseInet(env, GetIntOption(env, fd, SOL_SOCKET, SO_DOMAIN), address, port);
    if (::bind(fd, reinterpret_cast<const sockaddr*>(&target.storage), target.length) < 0) {
      const int error_number = errno;  // (read first: Endpoint() allocates, and argument order is unspecified)
      Napi::Error error = ErrnoError(env, error_number, "bind", Endpoint(address, port));
      error.Set("address", Napi::String::New(env, address));
      error.Set("port", Napi::Number::New(env, port));
      throw error;
    }
    return env.Undefined();
  }

  Napi::Value ConnectStart(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const std::string address = StringArg(info, 1, "address");
    const int port = static_cast<int>(IntegerArg(info, 2, "port", 0, 65535));
    // The caller that made the socket knows its family (4 or 6) and saves the SO_DOMAIN read; a wrong one is the
    // kernel's EINVAL or EAFNOSUPPORT at the connect.
    const bool has_family = info.Length() > 3 && !info[3].IsUndefined();
    const int family = has_family ? static_cast<int>(IntegerArg(info, 3, "family", 4, 6)) : 0;
    if (family == 5) ThrowRangeError(env, "ERR_OUT_OF_RANGE", "The \"family\" argument must be 4 or 6");
    const int domain = family == 4 ? AF_INET : family == 6 ? AF_INET6 : GetIntOption(env, fd, SOL_SOCKET, SO_DOMAIN);
    const InetAddress target = ParseInet(env, domain, address, port);
    const bool connected = ::connect(fd, reinterpret_cast<const sockaddr*>(&target.storage), target.length) == 0;
    // EINTR on a non-blocking connect: the handshake carries on in the background, like EINPROGRESS.
    if (connected || errno == EINPROGRESS || errno == EINTR) {
      // From here on, no other connect() of this socket: not ours, not a client's through a copy it was lent (where
      // the guard's program saw this connect: guardCovers).
      GuardSocketOrThrow(env, fd, true);
      return Napi::Boolean::New(env, connected);
    }
    const int error_number = errno;  // (read first: Endpoint() allocates, and argument order is unspecified)
    Napi::Error error = ErrnoError(env, error_number, "connect", Endpoint(address, port));
    error.Set("address", Napi::String::New(env, address));
    error.Set("port", Napi::Number::New(env, port));
    throw error;
  }

  Napi::Value SocketError(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int error = GetIntOption(env, FdArg(info, 0), SOL_SOCKET, SO_ERROR);
    if (error == 0) return env.Null();
    return Napi::String::New(env, ErrnoName(error));
  }

  Napi::Value LocalAddress(const Napi::CallbackInfo& info) { return SocketAddress(info, ::getsockname, "getsockname"); }

  // getpeername as { address, family, port }; given a Float64Array of at least kPeerWords, the same peer is written
  // there as TcpInfo's withPeer writes it (WritePeerWords): the connector's one read serves its policy check (the
  // text) and the socket's lease mark (the words).
  Napi::Value PeerAddress(const Napi::CallbackInfo& info) {
    double* words = nullptr;
    if (!IsAbsent(info, 1)) {
      words = Float64ArrayArg(info, 1, kPeerWords, "words must be a Float64Array of at least 4 elements");
    }
    return SocketAddress(info, ::getpeername, "getpeername", words);
  }

  // getsockname or getpeername of the fd argument, as { address, family, port }; with `words`, the same address
  // there too (WritePeerWords).
  static Napi::Value SocketAddress(const Napi::CallbackInfo& info, int (*query)(int, sockaddr*, socklen_t*),
                                   const char* syscall, double* words = nullptr) {
    Napi::Env env = info.Env();
    sockaddr_storage storage;
    memset(&storage, 0, sizeof storage);
    socklen_t length = sizeof storage;
    if (query(FdArg(info, 0), reinterpret_cast<sockaddr*>(&storage), &length) < 0) ThrowErrno(env, errno, syscall);
    Napi::Value address = FormatInet(env, storage, syscall);  // (throws for a family other than IPv4 and IPv6)
    if (words != nullptr) WritePeerWords(storage, words);
    return address;
  }

  // -- Socket options

  Napi::Value SetNoDelay(const Napi::CallbackInfo& info) {
    const int fd = FdArg(info, 0);
    SetIntOption(info.Env(), fd, IPPROTO_TCP, TCP_NODELAY, BoolArg(info, 1, "on") ? 1 : 0, "TCP_NODELAY");
    return info.Env().Undefined();
  }

  // SO_LINGER {1, 0}: the next close of the socket sends a reset (RST) and drops what is unsent. Node's
  // socket.resetAndDestroy() does the same through uv_tcp_close_reset, which refuses (EINVAL) while a shutdown is
  // pending and then never closes the handle at all (see daemon/socket-reset.ts); this lets the caller reset any
  // socket with a plain destroy().
  Napi::Value SetLingerReset(const Napi::CallbackInfo& info) {
    const int fd = FdArg(info, 0);
    const struct linger reset = {1, 0};
    if (::setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof reset) < 0) ThrowErrno(info.Env(), errno, "SO_LINGER");
    return info.Env().Undefined();
  }

  // SO_LINGER {0, 0}, the kernel's default (DisarmLinger): undoes SetLingerReset, so the next close ends the
  // connection cleanly (FIN after what is queued). Errors ignored, as in DisarmLinger.
  Napi::Value DisarmSocketLinger(const Napi::CallbackInfo& info) {
    DisarmLinger(FdArg(info, 0));
    return info.Env().Undefined();
  }

  Napi::Value SetKeepAlive(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const bool on = BoolArg(info, 1, "on");
    // Validate every argument before the first setsockopt, so a bad call changes nothing.
    const int idle = IsAbsent(info, 2) ? 0 : static_cast<int>(IntegerArg(info, 2, "idleSec", 1, INT32_MAX));
    const int interval = IsAbsent(info, 3) ? 0 : static_cast<int>(IntegerArg(info, 3, "intervalSec", 1, INT32_MAX));
    const int count = IsAbsent(info, 4) ? 0 : static_cast<int>(IntegerArg(info, 4, "count", 1, INT32_MAX));
    SetIntOption(env, fd, SOL_SOCKET, SO_KEEPALIVE, on ? 1 : 0, "SO_KEEPALIVE");
    if (idle > 0) SetIntOption(env, fd, IPPROTO_TCP, TCP_KEEPIDLE, idle, "TCP_KEEPIDLE");
    if (interval > 0) SetIntOption(env, fd, IPPROTO_TCP, TCP_KEEPINTVL, interval, "TCP_KEEPINTVL");
    if (count > 0) SetIntOption(env, fd, IPPROTO_TCP, TCP_KEEPCNT, count, "TCP_KEEPCNT");
    return env.Undefined();
  }

  Napi::Value SetUserTimeout(const Napi::CallbackInfo& info) {
    const int fd = FdArg(info, 0);
    const int ms = static_cast<int>(IntegerArg(info, 1, "ms", 0, INT32_MAX));
    SetIntOption(info.Env(), fd, IPPROTO_TCP, TCP_USER_TIMEOUT, ms, "TCP_USER_TIMEOUT");
    return info.Env().Undefined();
  }

  Napi::Value SetMark(const Napi::CallbackInfo& info) {
    const int fd = FdArg(info, 0);
    const uint32_t mark = static_cast<uint32_t>(IntegerArg(info, 1, "mark", 0, UINT32_MAX));
    // Needs CAP_NET_ADMIN; without it the kernel says EPERM, thrown like any other failure.
    SetOption(info.Env(), fd, SOL_SOCKET, SO_MARK, &mark, sizeof mark, "SO_MARK");
    return info.Env().Undefined();
  }

  Napi::Value BindToDevice(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const std::string name = StringArg(info, 1, "name");
    // The kernel silently truncates longer names; no interface can have one, so say so instead.
    if (name.size() >= IFNAMSIZ || name.find('\0') != std::string::npos) {
      ThrowErrno(env, ENODEV, "setsockopt", "SO_BINDTODEVICE");
    }
    // An empty name removes the binding.
    SetOption(env, fd, SOL_SOCKET, SO_BINDTODEVICE, name.c_str(), static_cast<socklen_t>(name.size()),
              "SO_BINDTODEVICE");
    return env.Undefined();
  }

  // TCP_ULP: attaches an upper-layer protocol ("tls" for kernel TLS) to a TCP socket. Used only to learn whether the
  // kernel has TLS ULP (ENOENT: neither built in nor loadable); nothing hands a socket with kernel TLS to anyone yet.
  Napi::Value SetTcpUlp(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const std::string name = StringArg(info, 1, "name");
    // TCP_ULP_NAME_MAX is 16 with the NUL; the kernel answers ENOENT for unknown names.
    if (name.empty() || name.size() >= 16 || name.find('\0') != std::string::npos) {
      ThrowErrno(env, EINVAL, "setsockopt", "TCP_ULP");
    }
    SetOption(env, fd, IPPROTO_TCP, TCP_ULP, name.c_str(), static_cast<socklen_t>(name.size()), "TCP_ULP");
    return env.Undefined();
  }

  // -- Sandboxing

  // Landlock: from now on this thread (and every thread and process it starts afterwards) may bind a TCP socket
  // only to the ports listed (0: an ephemeral port the kernel picks). Threads that exist already are not
  // restricted: Landlock applies to the calling thread. Sets no_new_privs on it first, as Landlock requires of a
  // caller without CAP_SYS_ADMIN. Returns { abi, applied }: abi 0 when the kernel has no Landlock (or it is
  // disabled; blocked: a system call filter refused it); applied false when its ABI predates network rules (Linux
  // < 6.7).
  Napi::Value RestrictTcpBind(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray()) {
      throw Napi::TypeError::New(env, "ports must be an array of integers 0-65535");
    }
    Napi::Array list = info[0].As<Napi::Array>();
    std::vector<uint64_t> ports;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value value = list.Get(i);
      const double number = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : -1;
      if (!(number >= 0 && number <= 65535) || std::floor(number) != number) {
        throw Napi::TypeError::New(env, "ports must be an array of integers 0-65535");
      }
      ports.push_back(static_cast<uint64_t>(number));
    }
    Napi::Object result = Napi::Object::New(env);
    const long abi = ::syscall(SYS_landlock_create_ruleset, nullptr, 0, kLandlockCreateRulesetVersion);
    // Read before any N-API call, which may change errno.
    const int version_error = abi < 0 ? errno : 0;
    // ENOSYS: no Landlock in this kernel; EOPNOTSUPP: not enabled at boot; EPERM: a seccomp filter refused the call
    // (systemd's @system-service of systemd 252 lacks the Landlock calls).
    if (abi < 0 && version_error != ENOSYS && version_error != EOPNOTSUPP && version_error != EPERM) {
      ThrowErrno(env, version_error, "landlock_create_ruleset");
    }
    result.Set("abi", Napi::Number::New(env, abi < 0 ? 0 : static_cast<double>(abi)));
    result.Set("blocked", Napi::Boolean::New(env, version_error == EPERM));
    if (abi < kLandlockFirstNetAbi) {
      result.Set("applied", Napi::Boolean::New(env, false));
      return result;
    }
    LandlockRulesetAttr ruleset = {0, kLandlockAccessNetBindTcp};
    FdGuard ruleset_fd(static_cast<int>(::syscall(SYS_landlock_create_ruleset, &ruleset, sizeof ruleset, 0)));
    if (ruleset_fd.get() < 0) ThrowErrno(env, errno, "landlock_create_ruleset");
    for (const uint64_t port : ports) {
      LandlockNetPortAttr rule = {kLandlockAccessNetBindTcp, port};
      if (::syscall(SYS_landlock_add_rule, ruleset_fd.get(), kLandlockRuleNetPort, &rule, 0) < 0) {
        ThrowErrno(env, errno, "landlock_add_rule", "port " + std::to_string(port));
      }
    }
    if (::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) ThrowErrno(env, errno, "prctl", "PR_SET_NO_NEW_PRIVS");
    if (::syscall(SYS_landlock_restrict_self, ruleset_fd.get(), 0) < 0) ThrowErrno(env, errno, "landlock_restrict_self");
    result.Set("applied", Napi::Boolean::New(env, true));
    return result;
  }

  // The connect guard (see above): loads its map and programs and links them to the cgroup v2 directory given (the
  // daemon's own). Needs CAP_BPF and CAP_NET_ADMIN; a failure throws the syscall's error (EPERM without them) and
  // leaves no guard. Once only per process. Returns the self-check's errno name, or null when the check's second
  // connect went through (the guard is not working).
  Napi::Value StartConnectGuard(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const std::string cgroup = StringArg(info, 0, "cgroup");
    if (g_guard_map.load() >= 0) ThrowErrno(env, EALREADY, "bpf", "the connect guard is already started");
    char log[4096] = "";
    const std::vector<uint8_t> btf = GuardBtf();
    bpf_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.btf = PointerBits(btf.data());
    attr.btf_size = static_cast<uint32_t>(btf.size());
    FdGuard btf_fd(static_cast<int>(Bpf(BPF_BTF_LOAD, &attr)));
    if (btf_fd.get() < 0) ThrowErrno(env, errno, "bpf", "BPF_BTF_LOAD");
    memset(&attr, 0, sizeof attr);
    attr.map_type = BPF_MAP_TYPE_SK_STORAGE;
    attr.key_size = sizeof(int);
    attr.value_size = sizeof(uint32_t);
    attr.max_entries = 0;
    attr.map_flags = BPF_F_NO_PREALLOC;
    strncpy(attr.map_name, "sockpool_lent", sizeof attr.map_name - 1);
    attr.btf_fd = static_cast<uint32_t>(btf_fd.get());
    attr.btf_key_type_id = 1;
    attr.btf_value_type_id = 1;
    FdGuard map(static_cast<int>(Bpf(BPF_MAP_CREATE, &attr)));
    if (map.get() < 0) ThrowErrno(env, errno, "bpf", "BPF_MAP_CREATE (socket storage)");
    const std::vector<bpf_insn> program = GuardProgram(map.get());
    FdGuard directory(::open(cgroup.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (directory.get() < 0) ThrowErrno(env, errno, "open", cgroup);
    std::vector<int> links;
    for (const bpf_attach_type type : {BPF_CGROUP_INET4_CONNECT, BPF_CGROUP_INET6_CONNECT}) {
      memset(&attr, 0, sizeof attr);
      attr.prog_type = BPF_PROG_TYPE_CGROUP_SOCK_ADDR;
      attr.expected_attach_type = type;
      attr.insns = PointerBits(program.data());
      attr.insn_cnt = static_cast<uint32_t>(program.size());
      attr.license = PointerBits("GPL");  // bpf_sk_storage_get is a GPL-only helper
      attr.log_buf = PointerBits(log);
      attr.log_size = sizeof log;
      attr.log_level = 1;
      strncpy(attr.prog_name, "sockpool_guard", sizeof attr.prog_name - 1);
      FdGuard loaded(static_cast<int>(Bpf(BPF_PROG_LOAD, &attr)));
      if (loaded.get() < 0) {
        const int err = errno;
        for (const int link : links) CloseQuietly(link);
        ThrowErrno(env, err, "bpf", std::string("BPF_PROG_LOAD: ") + log);
      }
      memset(&attr, 0, sizeof attr);
      attr.link_create.prog_fd = static_cast<uint32_t>(loaded.get());
      attr.link_create.target_fd = static_cast<uint32_t>(directory.get());
      attr.link_create.attach_type = type;
      const int link = static_cast<int>(Bpf(BPF_LINK_CREATE, &attr));
      if (link < 0) {
        const int err = errno;
        for (const int made : links) CloseQuietly(made);
        ThrowErrno(env, err, "bpf", "BPF_LINK_CREATE " + cgroup);
      }
      links.push_back(link);  // the process's until it exits (see above)
    }
    g_guard_map.store(map.release(), std::memory_order_release);
    const int check = GuardSelfCheck(env);
    return check == 0 ? env.Null() : Napi::String::New(env, ErrnoName(check));
  }

  // Registers a socket the daemon did not connect through connectStart (one taken back from systemd's fd store).
  // No guard: nothing.
  Napi::Value GuardSocket(const Napi::CallbackInfo& info) {
    GuardSocketOrThrow(info.Env(), FdArg(info, 0));
    return info.Env().Undefined();
  }

  // Whether the kernel refuses every connect() of the socket from now on (GuardCovers). No guard: false.
  Napi::Value GuardCovers(const Napi::CallbackInfo& info) {
    return Napi::Boolean::New(info.Env(), ::GuardCovers(FdArg(info, 0)));
  }

  // Drops the capabilities listed (numbers, linux/capability.h) from the calling thread's effective, permitted,
  // inheritable and ambient sets, for good. Threads started afterwards inherit the smaller sets; threads that exist
  // already keep theirs (capabilities are per thread).
  Napi::Value DropCapabilities(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray()) throw Napi::TypeError::New(env, "capabilities must be an array");
    Napi::Array list = info[0].As<Napi::Array>();
    __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    if (::syscall(SYS_capget, &header, data) < 0) ThrowErrno(env, errno, "capget");
    std::vector<int> drop;
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value value = list.Get(i);
      const double number = value.IsNumber() ? value.As<Napi::Number>().DoubleValue() : -1;
      if (!(number >= 0 && number < 32 * _LINUX_CAPABILITY_U32S_3) || std::floor(number) != number) {
        throw Napi::TypeError::New(env, "capabilities must be capability numbers");
      }
      drop.push_back(static_cast<int>(number));
    }
    for (const int capability : drop) {
      const uint32_t bit = 1U << (capability % 32);
      __user_cap_data_struct& word = data[capability / 32];
      word.effective &= ~bit;
      word.permitted &= ~bit;
      word.inheritable &= ~bit;
      // Lowering the ambient set first: a capability leaves it anyway once it leaves permitted or inheritable.
      ::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_LOWER, capability, 0, 0);
    }
    if (::syscall(SYS_capset, &header, data) < 0) ThrowErrno(env, errno, "capset");
    return env.Undefined();
  }

  // The calling thread (pid 0 is the caller's thread id, not the process) under SCHED_RR at `priority`, with
  // SCHED_RESET_ON_FORK: every thread or process it creates afterwards starts under the normal policy again, so only
  // this thread is real-time (daemon/realtime.ts says why). Needs CAP_SYS_NICE or an RLIMIT_RTPRIO of at least
  // `priority`, and, on a kernel with real-time group scheduling, a real-time budget in the thread's CPU cgroup
  // (EPERM otherwise, as without the privilege). Throws the errno.
  Napi::Value SetRealtimePriority(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const double number = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    const int lowest = ::sched_get_priority_min(SCHED_RR);
    const int highest = ::sched_get_priority_max(SCHED_RR);
    if (!(number >= lowest && number <= highest) || std::floor(number) != number) {
      throw Napi::TypeError::New(env, "priority must be an integer from " + std::to_string(lowest) + " to " +
                                          std::to_string(highest));
    }
    sched_param parameters = {};
    parameters.sched_priority = static_cast<int>(number);
    if (::sched_setscheduler(0, SCHED_RR | SCHED_RESET_ON_FORK, &parameters) < 0) {
      ThrowErrno(env, errno, "sched_setscheduler");
    }
    return env.Undefined();
  }

  // -- Routing

  // The kernel's routes of type RTN_LOCAL, IPv4's then IPv6's, of table `table` (absent or 0: every table), as
  // { routes: [{ family, address, prefixLength, table }], received } (see DumpLocalRoutes). The netlink socket is
  // this call's own, closed before it returns or throws; blocking (with a receive timeout), unlike the addon's other
  // sockets: a dump is read to its end within the call.
  Napi::Value LocalRoutes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const uint32_t table =
        IsAbsent(info, 0) ? 0 : static_cast<uint32_t>(IntegerArg(info, 0, "table", 0, UINT32_MAX));
    FdGuard socket(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
    if (socket.get() < 0) ThrowErrno(env, errno, "socket", "AF_NETLINK");
    // A kernel before 4.20 lacks the option (ENOPROTOOPT): its dumps are not filtered, DumpLocalRoutes still is.
    const int on = 1;
    if (::setsockopt(socket.get(), SOL_NETLINK, kNetlinkGetStrictChk, &on, sizeof on) < 0 && errno != ENOPROTOOPT) {
      ThrowErrno(env, errno, "setsockopt", "NETLINK_GET_STRICT_CHK");
    }
    const timeval timeout = {kNetlinkReceiveTimeoutMs / 1000, (kNetlinkReceiveTimeoutMs % 1000) * 1000};
    SetOption(env, socket.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout, "SO_RCVTIMEO");
    std::vector<LocalRoute> routes;
    size_t received = 0;
    uint32_t sequence = 0;
    for (const int family : {AF_INET, AF_INET6}) {
      DumpLocalRoutes(env, socket.get(), family, table, &sequence, &routes, &received);
    }
    socket.reset(-1);
    Napi::Array list = Napi::Array::New(env, routes.size());
    for (size_t i = 0; i < routes.size(); i++) {
      const LocalRoute& route = routes[i];
      char text[INET6_ADDRSTRLEN];
      ::inet_ntop(route.family, route.address, text, sizeof text);
      Napi::Object entry = Napi::Object::New(env);
      entry.Set("family", Napi::Number::New(env, route.family == AF_INET ? 4 : 6));
      entry.Set("address", Napi::String::New(env, text));
      entry.Set("prefixLength", Napi::Number::New(env, route.prefix_length));
      entry.Set("table", Napi::Number::New(env, route.table));
      list.Set(static_cast<uint32_t>(i), entry);
    }
    Napi::Object result = Napi::Object::New(env);
    result.Set("routes", list);
    result.Set("received", Napi::Number::New(env, static_cast<double>(received)));
    return result;
  }

  // -- Liveness and identity

  // Is an idle socket still usable? Peeks one byte without consuming it; for TCP also reads tcpi_state.
  //
  // A peek starts at the socket's peek offset (SO_PEEK_OFF: an option of the socket, which a client holding a copy
  // of a lent TCP socket can set since Linux 6.10), so bytes before it go unseen: an established TCP socket the peek
  // finds empty is asked its queue's length too (SIOCINQ, which no offset moves). That costs nothing: TCP_INFO
  // answers whether it is TCP (other sockets refuse the option), where a SO_PROTOCOL read asked before.
  Napi::Value Probe(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    int tcp_state = -1;
    tcp_info tcp;
    memset(&tcp, 0, sizeof tcp);
    socklen_t tcp_length = sizeof tcp;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &tcp, &tcp_length) == 0) tcp_state = tcp.tcpi_state;
    uint8_t byte;
    ssize_t peeked;
    do {
      peeked = ::recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    } while (peeked < 0 && errno == EINTR);
    const int recv_error = peeked < 0 ? errno : 0;
    Napi::Object result = Napi::Object::New(env);
    if (peeked > 0) {
      result.Set("state", "data");  // bytes nobody asked for: the connection is out of step
    } else if (peeked == 0) {
      result.Set("state", "eof");  // the peer closed (a TCP socket in CLOSE_WAIT lands here)
    } else if (recv_error == EAGAIN || recv_error == EWOULDBLOCK) {
      int unread = 0;
      if (tcp_state == TCP_ESTABLISHED && ::ioctl(fd, SIOCINQ, &unread) == 0 && unread > 0) {
        result.Set("state", "data");  // behind the peek offset
      } else if (tcp_state < 0 || tcp_state == TCP_ESTABLISHED) {
        result.Set("state", "alive");
      } else {
        // Nothing to read, yet not ESTABLISHED (still connecting, or we shut it down): not usable.
        result.Set("state", "error");
        result.Set("error", ErrnoName(ENOTCONN));
      }
    } else {
      result.Set("state", "error");
      result.Set("error", ErrnoName(recv_error));
    }
    if (tcp_state >= 0) result.Set("tcpState", tcp_state);
    return result;
  }

  // What a TCP socket carried since it was connected, and what waits in its queues: the daemon compares a lent
  // socket's counters before and after the lease to know whether a client used it.
  Napi::Value TcpCounters(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    KernelTcpInfo tcp;
    memset(&tcp, 0, sizeof tcp);
    socklen_t length = sizeof tcp;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &tcp, &length) < 0) ThrowErrno(env, errno, "getsockopt", "TCP_INFO");
    Napi::Object result = Napi::Object::New(env);
    // The queue lengths are two more syscalls: callers that only need the counters say so.
    if (IsAbsent(info, 1) || BoolArg(info, 1, "queues")) {
      int outq = 0;
      int inq = 0;
      if (::ioctl(fd, SIOCOUTQ, &outq) < 0) ThrowErrno(env, errno, "ioctl", "SIOCOUTQ");
      if (::ioctl(fd, SIOCINQ, &inq) < 0) ThrowErrno(env, errno, "ioctl", "SIOCINQ");
      result.Set("outq", outq);
      result.Set("inq", inq);
    }
    result.Set("tcpState", tcp.base.tcpi_state);
    // Kernels older than 4.19 fill less of the struct: a counter they do not report is left out.
    if (length >= offsetof(KernelTcpInfo, segs_out)) {
      result.Set("bytesAcked", static_cast<double>(tcp.bytes_acked));
      result.Set("bytesReceived", static_cast<double>(tcp.bytes_received));
    }
    if (length >= offsetof(KernelTcpInfo, min_rtt)) result.Set("notsentBytes", tcp.notsent_bytes);
    if (length >= offsetof(KernelTcpInfo, bytes_retrans)) result.Set("bytesSent", static_cast<double>(tcp.bytes_sent));
    return result;
  }

  // The handoff path's one probe: a single TCP_INFO read written into a caller's Float64Array (no object built):
  // [tcpState, bytesSent, bytesAcked, bytesReceived, notsentBytes]; a counter the kernel does not report is NaN.
  // withPeer adds the peer (one getpeername); withMark the inode (one fstat) and both queue lengths, each read with
  // an ioctl only when TCP_INFO cannot tell it is 0: a fresh socket's whole mark in three syscalls (lease-guard's
  // markOf).
  Napi::Value TcpInfo(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    TypedArrayView out_view;
    if (!ReadTypedArray(info, 1, &out_view) || out_view.type != napi_float64_array ||
        out_view.length < kTcpInfoFields) {
      throw Napi::TypeError::New(env, "out must be a Float64Array of at least 5 elements");
    }
    const bool with_peer = !IsAbsent(info, 2) && BoolArg(info, 2, "withPeer");
    if (with_peer && out_view.length < kTcpInfoFieldsWithPeer) {
      throw Napi::TypeError::New(env, "out must be a Float64Array of at least 9 elements with withPeer");
    }
    const bool with_mark = !IsAbsent(info, 3) && BoolArg(info, 3, "withMark");
    if (with_mark && out_view.length < kTcpInfoFieldsWithMark) {
      throw Napi::TypeError::New(env, "out must be a Float64Array of at least 12 elements with withMark");
    }
    FillTcpInfo(env, fd, static_cast<double*>(out_view.data), with_peer, with_mark);
    return env.Undefined();
  }

  // The array tcpInfoScratch() writes, given once per thread (shared/native.ts): a read then passes an fd and flags
  // alone. Checking a typed array argument and two optional booleans cost the release check, on every handoff,
  // about as much as the syscall's own entry. Kept referenced, so its memory stays where it is.
  Napi::Value SetTcpInfoScratch(const Napi::CallbackInfo& info) {
    double* out =
        Float64ArrayArg(info, 0, kTcpInfoFieldsWithMark, "out must be a Float64Array of at least 12 elements");
    tcp_scratch_ref_ = Napi::Persistent(info[0].As<Napi::Object>());
    tcp_scratch_ = out;
    return info.Env().Undefined();
  }

  // TcpInfo into the array SetTcpInfoScratch gave; flags: 1 withPeer, 2 withMark.
  Napi::Value TcpInfoScratch(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const int flags = static_cast<int>(IntegerArg(info, 1, "flags", 0, 3));
    if (tcp_scratch_ == nullptr) throw Napi::Error::New(env, "setTcpInfoScratch was not called");
    FillTcpInfo(env, fd, tcp_scratch_, (flags & 1) != 0, (flags & 2) != 0);
    return env.Undefined();
  }

  // TcpInfo's reads into `out` (room for what the flags ask checked by the caller).
  static void FillTcpInfo(Napi::Env env, int fd, double* out, bool with_peer, bool with_mark) {
    if (with_mark) {
      struct stat st;
      if (::fstat(fd, &st) < 0) ThrowErrno(env, errno, "fstat");
      // What getpeername or getsockopt would say next, without asking them.
      if (!S_ISSOCK(st.st_mode)) ThrowErrno(env, ENOTSOCK, "fstat");
      out[9] = static_cast<double>(st.st_ino);
    }
    if (with_peer) {
      sockaddr_storage peer;
      socklen_t peer_length = sizeof peer;
      if (::getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_length) < 0) {
        ThrowErrno(env, errno, "getpeername");
      }
      if (!WritePeerWords(peer, out + 5)) ThrowErrno(env, EAFNOSUPPORT, "getpeername");
    }
    KernelTcpInfo tcp;
    memset(&tcp, 0, sizeof tcp);
    socklen_t length = sizeof tcp;
    if (::getsockopt(fd, IPPROTO_TCP, TCP_INFO, &tcp, &length) < 0) ThrowErrno(env, errno, "getsockopt", "TCP_INFO");
    const double absent = std::numeric_limits<double>::quiet_NaN();
    const bool counters = length >= offsetof(KernelTcpInfo, segs_out);
    out[0] = tcp.base.tcpi_state;
    out[1] = length >= offsetof(KernelTcpInfo, bytes_retrans) ? static_cast<double>(tcp.bytes_sent) : absent;
    out[2] = counters ? static_cast<double>(tcp.bytes_acked) : absent;
    out[3] = counters ? static_cast<double>(tcp.bytes_received) : absent;
    out[4] = length >= offsetof(KernelTcpInfo, min_rtt) ? static_cast<double>(tcp.notsent_bytes) : absent;
    if (with_mark) {
      // When TCP_INFO alone says a queue is empty (only in ESTABLISHED, the one state a mark is kept for; in any
      // other both ioctls are read, and on a listener they fail with EINVAL as tcpCounters does):
      // - SIOCINQ is rcv_nxt - copied_seq (less for urgent data), at most what rcv_nxt moved past after the peer's
      //   SYN, and each such byte adds to bytes_received (tcp_rcv_nxt_update; data in a Fast Open SYN and a
      //   receive queue restored with TCP_REPAIR count too): bytes_received 0 means 0 unread.
      // - SIOCOUTQ is write_seq - snd_una: notsent_bytes (write_seq - snd_nxt) plus what was sent and not yet
      //   acknowledged (snd_nxt - snd_una; no FIN has been sent in ESTABLISHED). Bytes sent count in bytes_sent
      //   (every data segment transmitted, retransmissions too) except a send queue restored with TCP_REPAIR,
      //   which advances snd_nxt without transmitting: those segments count in tcpi_unacked (packets_out) instead,
      //   as every segment between snd_una and snd_nxt does. So notsent 0 with unacked 0 means 0 queued; bytes_sent
      //   0 is asked as well, so that a socket that ever sent data (a used socket adopted from the fd store) keeps
      //   its ioctl rather than rest on the retransmit queue's bookkeeping alone. A fresh connect meets all three.
      // A kernel without these counters (before 4.19 for bytes_sent, 4.1 for bytes_received) gets the ioctls.
      const bool established = tcp.base.tcpi_state == TCP_ESTABLISHED;
      const bool no_input = established && counters && tcp.bytes_received == 0;
      const bool no_output = established && length >= offsetof(KernelTcpInfo, bytes_retrans) &&
                             tcp.notsent_bytes == 0 && tcp.bytes_sent == 0 && tcp.base.tcpi_unacked == 0;
      int outq = 0;
      int inq = 0;
      if (!no_output && ::ioctl(fd, SIOCOUTQ, &outq) < 0) ThrowErrno(env, errno, "ioctl", "SIOCOUTQ");
      if (!no_input && ::ioctl(fd, SIOCINQ, &inq) < 0) ThrowErrno(env, errno, "ioctl", "SIOCINQ");
      out[10] = outq;
      out[11] = inq;
    }
  }

  // fstat that never waits for the file's filesystem (see SocketKind): statx with AT_STATX_DONT_SYNC answers from
  // what the kernel holds (a FUSE mount is sent no GETATTR), one syscall as fstat was. Enough for what is read here:
  // the type, and a socket's device and inode (sockfs has nothing to fetch). Errors are reported as fstat's.
  static void StatCachedOrThrow(Napi::Env env, int fd, struct statx* status) {
    if (::statx(fd, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, STATX_TYPE | STATX_INO, status) < 0) {
      ThrowErrno(env, errno, "fstat");
    }
  }

  // The socket's inode (its identity while any copy of it is open), or -1 when fd is not a socket. `fd` may be a
  // client's (a released fd): StatCachedOrThrow.
  Napi::Value SocketInode(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    struct statx status;
    StatCachedOrThrow(env, FdArg(info, 0), &status);
    return Napi::Number::New(env, S_ISSOCK(status.stx_mode) ? static_cast<double>(status.stx_ino) : -1.0);
  }

  // SIOCOUTQ of an AF_UNIX socket: the memory of the messages it sent that the peer has not received yet (each
  // message's buffer is charged to the sender until the receiver reads it). 0 means the peer has read everything,
  // so no fd sent with SCM_RIGHTS is still in flight (fds in flight count against the sender's RLIMIT_NOFILE).
  Napi::Value UnreadOutput(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    int outq = 0;
    if (::ioctl(FdArg(info, 0), SIOCOUTQ, &outq) < 0) ThrowErrno(env, errno, "ioctl", "SIOCOUTQ");
    return Napi::Number::New(env, outq);
  }

  // Does fd a refer to the same open socket as fd b (the kernel's own identity: device and inode)? Either may be a
  // client's: StatCachedOrThrow.
  Napi::Value SameSocket(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    struct statx a;
    struct statx b;
    StatCachedOrThrow(env, FdArg(info, 0), &a);
    StatCachedOrThrow(env, FdArg(info, 1), &b);
    return Napi::Boolean::New(env, S_ISSOCK(a.stx_mode) && a.stx_dev_major == b.stx_dev_major &&
                                       a.stx_dev_minor == b.stx_dev_minor && a.stx_ino == b.stx_ino);
  }

  // shutdown(SHUT_RDWR): the connection ends for every process holding a copy of the socket. A socket that is
  // already not connected returns false.
  Napi::Value Shutdown(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (::shutdown(FdArg(info, 0), SHUT_RDWR) == 0) return Napi::Boolean::New(env, true);
    if (errno == ENOTCONN) return Napi::Boolean::New(env, false);
    ThrowErrno(env, errno, "shutdown");
  }

  // connect(AF_UNSPEC): the kernel's disconnect of a TCP socket, for every copy of it. From an established
  // connection it sends the peer a reset and leaves the socket's own reads failing with ECONNRESET (sk_err), where
  // a shutdown sends a FIN and leaves them reading a clean end. Returns false where the kernel refuses it (not
  // connected, or not TCP); a socket whose connection already ended is disconnected again without an error: true.
  Napi::Value Disconnect(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    sockaddr unspecified;
    memset(&unspecified, 0, sizeof unspecified);
    unspecified.sa_family = AF_UNSPEC;
    if (::connect(FdArg(info, 0), &unspecified, sizeof unspecified) == 0) return Napi::Boolean::New(env, true);
    if (errno == ENOTCONN || errno == EINVAL || errno == EAFNOSUPPORT) return Napi::Boolean::New(env, false);
    ThrowErrno(env, errno, "connect", "AF_UNSPEC");
  }

  Napi::Value PeerCredentials(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    ucred credentials;
    socklen_t length = sizeof credentials;
    if (::getsockopt(FdArg(info, 0), SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) {
      ThrowErrno(env, errno, "getsockopt", "SO_PEERCRED");
    }
    Napi::Object result = Napi::Object::New(env);
    result.Set("pid", credentials.pid);
    result.Set("uid", credentials.uid);
    result.Set("gid", credentials.gid);
    return result;
  }

  // SO_PEERGROUPS (Linux 4.13): the peer's supplementary groups at connect time, which SO_PEERCRED leaves out.
  // SO_PASSRIGHTS = 0 on a Unix socket: the kernel refuses SCM_RIGHTS sent to it (the sender's sendmsg fails with
  // EPERM), so no fd of a client's ever enters the daemon's table and none has to be closed there (closing a file on
  // the client's own FUSE mount waits for that client, uninterruptibly). Set on a listener, the connections it
  // accepts inherit it, even those that queued a message before their accept. Linux 6.16; false where the kernel does
  // not know the option (ENOPROTOOPT), true where it applied.
  Napi::Value RefuseFdPassing(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const int off = 0;
    if (::setsockopt(fd, SOL_SOCKET, kSoPassRights, &off, sizeof off) == 0) return Napi::Boolean::New(env, true);
    if (errno == ENOPROTOOPT) return Napi::Boolean::New(env, false);
    ThrowErrno(env, errno, "setsockopt", "SO_PASSRIGHTS");
    return env.Undefined();
  }

  Napi::Value PeerGroups(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    std::vector<gid_t> groups(32);
    socklen_t length = groups.size() * sizeof(gid_t);
    while (::getsockopt(fd, SOL_SOCKET, SO_PEERGROUPS, groups.data(), &length) < 0) {
      // ERANGE: `length` now says how much the list needs.
      if (errno != ERANGE || length <= groups.size() * sizeof(gid_t)) ThrowErrno(env, errno, "getsockopt", "SO_PEERGROUPS");
      groups.resize(length / sizeof(gid_t));
    }
    const size_t count = length / sizeof(gid_t);
    Napi::Array result = Napi::Array::New(env, count);
    for (size_t i = 0; i < count; i++) result.Set(static_cast<uint32_t>(i), Napi::Number::New(env, groups[i]));
    return result;
  }

  // -- Ownership

  // An fd a Poller of this thread watches is not closed: libuv would keep watching a number that the next socket()
  // may reuse.
  void ThrowIfPolled(Napi::Env env, int fd) {
    if (polled_->count(fd) == 0) return;
    throw CodeError(env, "SOCKPOOL_ERR_FD_POLLED", "close",
                    "close SOCKPOOL_ERR_FD_POLLED: fd " + std::to_string(fd) +
                        " is watched by a Poller or a PollSet of this thread; close the Poller or remove the fd first");
  }

  Napi::Value Close(const Napi::CallbackInfo& info) { return CloseFd(info, true); }

  // close() without the linger disarm, for a socket whose every copy was this process's own from its socket() on
  // (the pool's, connected here and never lent or sent): no client could have set SO_LINGER on it, so its linger is
  // what this process left (the kernel's default: off) and the close cannot wait. The caller vouches for that; a
  // socket a client had, or may have, goes through Close.
  Napi::Value CloseNeverShared(const Napi::CallbackInfo& info) { return CloseFd(info, false); }

  // Close and CloseNeverShared: the fd argument is closed, untracked and watched (the close watchdog: a linger set
  // again after the disarm, or a wrong vouch, must not hold the thread for good).
  Napi::Value CloseFd(const Napi::CallbackInfo& info, bool disarm_linger) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    ThrowIfPolled(env, fd);
    tracked_.erase(fd);
    const WatchedCall watched;
    if (disarm_linger) DisarmLinger(fd);  // (see DisarmLinger: no client can make this close wait)
    // Linux releases the fd even when close() reports EINTR: never retry, and report only real errors (EBADF).
    if (::close(fd) < 0 && errno != EINTR) ThrowErrno(env, errno, "close");
    return env.Undefined();
  }

  // close() for an fd a client sent, or a Unix socket whose unread messages a client sent: every fd queued in it
  // is taken out and discarded first (DiscardQuietly), so no close waits for a client's lingering socket. `uid`
  // (optional): the client's, whose share of the closing threads the fds take (DeferredCloser).
  Napi::Value Discard(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const int64_t uid = info.Length() > 1 && !info[1].IsUndefined() ? IntegerArg(info, 1, "uid", 0, 0xffffffff)
                                                                      : kUnknownUid;
    ThrowIfPolled(env, fd);
    if (::fcntl(fd, F_GETFD) < 0) ThrowErrno(env, errno, "close");
    tracked_.erase(fd);
    const WatchedCall watched;
    DiscardQuietly(fd, 0, uid);
    return env.Undefined();
  }

  // The close watchdog, for this process from now on (see WatchedCall). Idempotent.
  Napi::Value StartCloseWatchdog(const Napi::CallbackInfo& info) {
    StartWatchdogOnce();
    return info.Env().Undefined();
  }

  // A second fd for the same socket (O_CLOEXEC); it belongs to the caller.
  Napi::Value Dup(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int copy = ::fcntl(FdArg(info, 0), F_DUPFD_CLOEXEC, 0);
    if (copy < 0) ThrowErrno(env, errno, "fcntl", "F_DUPFD_CLOEXEC");
    return Napi::Number::New(env, copy);  // ownership passes to the caller
  }

  Napi::Value Untrack(const Napi::CallbackInfo& info) {
    tracked_.erase(FdArg(info, 0));  // ownership moves elsewhere (curl, another process): teardown skips it
    return info.Env().Undefined();
  }

  Napi::Value Track(const Napi::CallbackInfo& info) {
    tracked_.insert(FdArg(info, 0));  // this environment takes ownership: teardown closes it
    return info.Env().Undefined();
  }

  // -- Process exit

  // _exit(2): ends the process at once, without joining its threads (process.exit() joins every worker thread,
  // and waits for ever for one that never finishes its teardown), atexit handlers or stdio flushing. The daemon's
  // entry point calls it only after its stop closed and flushed everything the daemon owns (daemon/command.ts).
  Napi::Value ExitNow(const Napi::CallbackInfo& info) {
    const double code = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : 1;
    ::_exit(code >= 0 && code <= 255 ? static_cast<int>(code) : 1);
  }

  // The deferred closes (DeferredCloser): { queued, stuckThreads, maxStuckThreads, maxStuckThreadsOfUids,
  // maxStuckThreadsPerUid }.
  Napi::Value DeferredCloses(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const DeferredCloser::Counts counts = DeferredCloser::Snapshot();
    Napi::Object result = Napi::Object::New(env);
    result.Set("queued", Napi::Number::New(env, static_cast<double>(counts.queued)));
    result.Set("stuckThreads", Napi::Number::New(env, counts.stuck));
    // The threads taken over from, and the owner, which may be stuck too.
    result.Set("maxStuckThreads", Napi::Number::New(env, kClosingThreads));
    // The threads inside closes of uids' fds, all uids together: the rest are kept for discards no uid is charged with.
    result.Set("maxStuckThreadsOfUids", Napi::Number::New(env, kClosingThreads - kKeptForUidless));
    // The threads inside closes of one uid's fds, the owner included; past the first, only while fewer than that are
    // inside closes in all.
    result.Set("maxStuckThreadsPerUid", Napi::Number::New(env, kMaxClosingPerUid));
    return result;
  }

  Napi::Value TrackedFds(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    std::vector<int> fds(tracked_.begin(), tracked_.end());
    std::sort(fds.begin(), fds.end());
    Napi::Array result = Napi::Array::New(env, fds.size());
    for (size_t i = 0; i < fds.size(); i++) result.Set(static_cast<uint32_t>(i), Napi::Number::New(env, fds[i]));
    return result;
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Poller: libuv readiness for one fd on this environment's loop (uv_poll_t).
//
// The uv_poll_t lives in a PollState on the heap, because uv_close() finishes on a later loop iteration and the
// JS object may be gone by then. A PollState is closed by whichever comes first: Poller.close(), the garbage
// collector (the JS object is pinned while polling is started, so only a stopped Poller can be collected), or the
// environment's teardown (an async cleanup hook that Node waits for until the close callback has run).

// The JS function a libuv handle of this addon calls back (Poller, PollSet): a reference that keeps it and the async
// context it runs in. Call() uses make_callback, not a plain call: the function runs in that context, and
// process.nextTick and microtasks are drained afterwards, like any libuv-driven callback in Node. A throwing callback
// is this thread's uncaught exception ('uncaughtException', or the worker's 'error' event), never an abort; a
// terminating thread cannot run JS, and then there is nothing to report.
struct LoopCallback {
  napi_ref function = nullptr;
  napi_async_context async_context = nullptr;

  // Keeps `fn`; throws, keeping nothing, when N-API refuses.
  void Init(Napi::Env env, napi_value fn, const char* resource) {
    if (napi_create_reference(env, fn, 1, &function) != napi_ok) {
      function = nullptr;
      throw Napi::Error::New(env, "sockpool native: napi_create_reference failed");
    }
    if (napi_async_init(env, nullptr, Napi::String::New(env, resource), &async_context) != napi_ok) {
      napi_delete_reference(env, function);
      function = nullptr;
      async_context = nullptr;
      throw Napi::Error::New(env, "sockpool native: napi_async_init failed");
    }
  }

  bool live() const { return function != nullptr; }

  // Idempotent.
  void Release(napi_env env) {
    if (function != nullptr) napi_delete_reference(env, function);
    if (async_context != nullptr) napi_async_destroy(env, async_context);
    function = nullptr;
    async_context = nullptr;
  }

  // `owner`: the reference of the JS object the function is called on (the global when null).
  void Call(napi_env env, napi_ref owner, size_t argc, const int32_t* args) const {
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value callback = nullptr;
    napi_value receiver = nullptr;
    napi_value argv[2];
    napi_value result;
    if (argc <= 2 && napi_get_reference_value(env, function, &callback) == napi_ok && callback != nullptr) {
      if (owner != nullptr) napi_get_reference_value(env, owner, &receiver);
      if (receiver == nullptr) napi_get_global(env, &receiver);
      for (size_t i = 0; i < argc; i++) napi_create_int32(env, args[i], &argv[i]);
      if (napi_make_callback(env, async_context, receiver, callback, argc, argv, &result) != napi_ok) {
        bool pending = false;
        napi_value exception;
        if (napi_is_exception_pending(env, &pending) == napi_ok && pending &&
            napi_get_and_clear_last_exception(env, &exception) == napi_ok) {
          napi_fatal_exception(env, exception);
        }
      }
    }
    napi_close_handle_scope(env, scope);
  }
};

// This thread's addon state and libuv loop, for a handle made now; throws when the environment has neither.
SockpoolAddon* AddonWithLoop(Napi::Env env, uv_loop_t** loop) {
  SockpoolAddon* addon = env.GetInstanceData<SockpoolAddon>();
  *loop = nullptr;
  if (addon == nullptr || napi_get_uv_event_loop(env, loop) != napi_ok || *loop == nullptr) {
    throw Napi::Error::New(env, "sockpool native: no event loop for this environment");
  }
  return addon;
}

struct PollState {
  uv_poll_t handle;
  napi_env env = nullptr;
  LoopCallback js;
  napi_async_cleanup_hook_handle teardown_hook = nullptr;
  std::shared_ptr<FdSet> polled;
  Poller* owner = nullptr;
  int fd = -1;
  bool closing = false;
};

void OnPollClosed(uv_handle_t* handle);
void BeginClose(PollState* state);

class Poller : public Napi::ObjectWrap<Poller> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "Poller",
                       {
                           InstanceMethod<&Poller::Start>("start"),
                           InstanceMethod<&Poller::Stop>("stop"),
                           InstanceMethod<&Poller::Close>("close"),
                           InstanceMethod<&Poller::RefLoop>("ref"),
                           InstanceMethod<&Poller::UnrefLoop>("unref"),
                       });
  }

  explicit Poller(const Napi::CallbackInfo& info) : Napi::ObjectWrap<Poller>(info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    if (!info[1].IsFunction()) {
      ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "The \"callback\" argument must be of type function");
    }
    uv_loop_t* loop;
    SockpoolAddon* addon = AddonWithLoop(env, &loop);
    // An fd this thread's PollSet watches: libuv does not know it, but two watchers would leave `polled` wrong.
    if (addon->polled()->count(fd) != 0) ThrowErrno(env, EEXIST, "uv_poll_init");
    auto state = std::make_unique<PollState>();
    state->env = env;
    state->fd = fd;
    state->polled = addon->polled();
    state->js.Init(env, info[1], "sockpool.Poller");
    const int result = uv_poll_init(loop, &state->handle, fd);  // also sets O_NONBLOCK on fd
    if (result < 0) {
      state->js.Release(env);
      ThrowErrno(env, -result, "uv_poll_init");  // UV_EEXIST: another Poller of this thread watches fd
    }
    state->handle.data = state.get();
    state->owner = this;
    state->polled->insert(fd);
    PollState* raw = state.release();  // from here the close callback frees it
    if (napi_add_async_cleanup_hook(env, OnTeardown, raw, &raw->teardown_hook) != napi_ok) {
      raw->teardown_hook = nullptr;
      raw->owner = nullptr;
      BeginClose(raw);
      throw Napi::Error::New(env, "sockpool native: napi_add_async_cleanup_hook failed");
    }
    state_ = raw;
  }

  ~Poller() override {
    if (state_ != nullptr) {
      state_->owner = nullptr;
      BeginClose(state_);
    }
  }

  void Detach() { state_ = nullptr; }

 private:
  PollState* state_ = nullptr;
  bool pinned_ = false;

  static void OnTeardown(napi_async_cleanup_hook_handle /*handle*/, void* data) {
    BeginClose(static_cast<PollState*>(data));  // OnPollClosed removes the hook, which tells Node we are done
  }

  static void OnPoll(uv_poll_t* handle, int status, int events) {
    auto* state = static_cast<PollState*>(handle->data);
    if (state->closing || !state->js.live()) return;
    const int32_t args[2] = {status, events};
    state->js.Call(state->env, state->owner != nullptr ? static_cast<napi_ref>(*state->owner) : nullptr, 2, args);
  }

  void Pin() {
    if (!pinned_) {
      Ref();
      pinned_ = true;
    }
  }

  void Unpin() {
    if (pinned_) {
      Unref();
      pinned_ = false;
    }
  }

  bool IsOpen() const { return state_ != nullptr && !state_->closing; }

  Napi::Value Start(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int events = static_cast<int>(IntegerArg(info, 0, "events", 1, kPollEventMask));
    if (!IsOpen()) throw CodeError(env, "SOCKPOOL_ERR_POLLER_CLOSED", nullptr, "the Poller is closed");
    const int result = uv_poll_start(&state_->handle, events, OnPoll);
    if (result < 0) ThrowErrno(env, -result, "uv_poll_start");
    Pin();  // while libuv may call back, the JS object must stay alive
    return env.Undefined();
  }

  Napi::Value Stop(const Napi::CallbackInfo& info) {
    if (IsOpen()) uv_poll_stop(&state_->handle);
    Unpin();
    return info.Env().Undefined();
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (state_ != nullptr) BeginClose(state_);  // idempotent; the fd itself stays open (the caller owns it)
    Unpin();
    return info.Env().Undefined();
  }

  Napi::Value RefLoop(const Napi::CallbackInfo& info) {
    if (IsOpen()) uv_ref(reinterpret_cast<uv_handle_t*>(&state_->handle));
    return info.Env().Undefined();
  }

  Napi::Value UnrefLoop(const Napi::CallbackInfo& info) {
    if (IsOpen()) uv_unref(reinterpret_cast<uv_handle_t*>(&state_->handle));
    return info.Env().Undefined();
  }
};

// Stops watching at once (uv_close removes the fd from epoll synchronously) and frees the state in OnPollClosed.
void BeginClose(PollState* state) {
  if (state->closing) return;
  state->closing = true;
  state->polled->erase(state->fd);
  state->js.Release(state->env);
  uv_close(reinterpret_cast<uv_handle_t*>(&state->handle), OnPollClosed);
}

void OnPollClosed(uv_handle_t* handle) {
  auto* state = static_cast<PollState*>(handle->data);
  if (state->owner != nullptr) state->owner->Detach();
  // Removing the hook either unregisters it or, during teardown, tells Node this Poller has finished closing.
  if (state->teardown_hook != nullptr) napi_remove_async_cleanup_hook(state->teardown_hook);
  delete state;
}

// ---------------------------------------------------------------------------------------------------------------
// PollSet: readiness for many fds through one epoll set of the addon's own, itself watched by one uv_poll_t on this
// environment's loop. Why: a Poller per fd costs, to set up, libuv's own checks (an epoll_ctl ADD and DEL), an
// O_NONBLOCK ioctl and an invalidating DEL before its registration, plus an N-API object, reference and async
// context, and as much again to close; the daemon made two per connect (the connect's wait, the idle watch). Here
// an fd costs one epoll_ctl to add and one to remove. Level-triggered, like uv_poll. Each wakeup reads up to the
// caller's buffer of ready fds in one epoll_wait and makes one call into JavaScript with their count; the buffer
// (an Int32Array given at construction) then holds [token, events] pairs. A member's epoll data carries its token
// and its requested events, so that an error or hang-up (EPOLLERR, EPOLLHUP) reports what was asked, as libuv does.
// The set keeps the loop alive only while it has members. It never owns the fds it watches (close() refuses them
// while they are members); its epoll fd is its own, closed with it.

class PollSet;

struct PollSetState {
  uv_poll_t handle;
  napi_env env = nullptr;
  LoopCallback js;
  napi_ref buffer = nullptr;  // the Int32Array the set writes [token, events] pairs into (PollSet::CurrentSlots)
  napi_async_cleanup_hook_handle teardown_hook = nullptr;
  std::shared_ptr<FdSet> polled;
  FdSet members;
  PollSet* owner = nullptr;
  size_t pairs = 0;  // what the buffer held at construction: the most one wakeup reads
  std::vector<epoll_event> ready;
  int epfd = -1;
  bool closing = false;
};

void BeginCloseSet(PollSetState* state);
void OnPollSetClosed(uv_handle_t* handle);

/** The most [token, events] pairs a PollSet reads in one epoll_wait, whatever its buffer's length. */
constexpr size_t kMaxPollSetPairs = 65536;

uint32_t EpollEventsFor(int events) {
  uint32_t wanted = 0;
  if ((events & UV_READABLE) != 0) wanted |= EPOLLIN;
  if ((events & UV_WRITABLE) != 0) wanted |= EPOLLOUT;
  if ((events & UV_DISCONNECT) != 0) wanted |= EPOLLRDHUP;
  return wanted;
}

class PollSet : public Napi::ObjectWrap<PollSet> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "PollSet",
                       {
                           InstanceMethod<&PollSet::Add>("add"),
                           InstanceMethod<&PollSet::Modify>("modify"),
                           InstanceMethod<&PollSet::Remove>("remove"),
                           InstanceMethod<&PollSet::Close>("close"),
                       });
  }

  explicit PollSet(const Napi::CallbackInfo& info) : Napi::ObjectWrap<PollSet>(info) {
    Napi::Env env = info.Env();
    if (!info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_int32_array ||
        info[0].As<Napi::TypedArray>().ElementLength() < 2) {
      ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "The \"buffer\" argument must be an Int32Array of at least 2");
    }
    if (!info[1].IsFunction()) {
      ThrowTypeError(env, "ERR_INVALID_ARG_TYPE", "The \"callback\" argument must be of type function");
    }
    uv_loop_t* loop;
    SockpoolAddon* addon = AddonWithLoop(env, &loop);
    Napi::Int32Array buffer = info[0].As<Napi::Int32Array>();
    auto state = std::make_unique<PollSetState>();
    state->env = env;
    state->polled = addon->polled();
    // Bounded: one epoll_wait takes at most this many (the rest stay ready for the next wakeup: level-triggered), and a
    // huge array asked for a huge allocation here, whose failure aborts the process.
    state->pairs = std::min<size_t>(buffer.ElementLength() / 2, kMaxPollSetPairs);
    state->ready.resize(state->pairs);
    FdGuard epfd(::epoll_create1(EPOLL_CLOEXEC));
    if (epfd.get() < 0) ThrowErrno(env, errno, "epoll_create1");
    if (napi_create_reference(env, info[0], 1, &state->buffer) != napi_ok) {
      throw Napi::Error::New(env, "sockpool native: napi_create_reference failed");
    }
    try {
      state->js.Init(env, info[1], "sockpool.PollSet");
    } catch (...) {
      napi_delete_reference(env, state->buffer);
      throw;
    }
    int result = uv_poll_init(loop, &state->handle, epfd.get());
    if (result < 0) {
      state->js.Release(env);
      napi_delete_reference(env, state->buffer);
      ThrowErrno(env, -result, "uv_poll_init");
    }
    state->handle.data = state.get();
    result = uv_poll_start(&state->handle, UV_READABLE, OnPoll);
    if (result < 0) {
      // The handle is initialised: only its close callback may free the state (and close the epoll fd).
      state->epfd = epfd.release();
      PollSetState* raw = state.release();
      BeginCloseSet(raw);
      ThrowErrno(env, -result, "uv_poll_start");
    }
    uv_unref(reinterpret_cast<uv_handle_t*>(&state->handle));  // until it has a member
    state->epfd = epfd.release();
    state->owner = this;
    PollSetState* raw = state.release();  // from here the close callback frees it
    if (napi_add_async_cleanup_hook(env, OnTeardown, raw, &raw->teardown_hook) != napi_ok) {
      raw->teardown_hook = nullptr;
      raw->owner = nullptr;
      BeginCloseSet(raw);
      throw Napi::Error::New(env, "sockpool native: napi_add_async_cleanup_hook failed");
    }
    state_ = raw;
  }

  ~PollSet() override {
    if (state_ != nullptr) {
      state_->owner = nullptr;
      BeginCloseSet(state_);
    }
  }

  void Detach() { state_ = nullptr; }

 private:
  PollSetState* state_ = nullptr;

  static void OnTeardown(napi_async_cleanup_hook_handle /*handle*/, void* data) {
    BeginCloseSet(static_cast<PollSetState*>(data));
  }

  // The buffer's memory as it is now, and how many pairs fit there (at most the constructor's); null when it has no
  // room left. The pointer the constructor read is not kept: JavaScript may detach the buffer at any time
  // (ArrayBuffer.prototype.transfer(), a postMessage transfer), and V8 then frees that memory or hands it to another
  // ArrayBuffer, which the set went on writing into. Valid until JavaScript runs again (the buffer is referenced).
  static int32_t* CurrentSlots(PollSetState* state, size_t* pairs) {
    napi_handle_scope scope;
    if (napi_open_handle_scope(state->env, &scope) != napi_ok) return nullptr;
    napi_value buffer = nullptr;
    napi_typedarray_type type;
    size_t length = 0;
    void* data = nullptr;
    int32_t* slots = nullptr;
    if (state->buffer != nullptr && napi_get_reference_value(state->env, state->buffer, &buffer) == napi_ok &&
        buffer != nullptr &&
        napi_get_typedarray_info(state->env, buffer, &type, &length, &data, nullptr, nullptr) == napi_ok &&
        data != nullptr && length >= 2) {
      slots = static_cast<int32_t*>(data);
      *pairs = std::min(state->pairs, length / 2);
    }
    napi_close_handle_scope(state->env, scope);
    return slots;
  }

  // The buffer was detached (or shrunk below one pair): a misuse of this set, which closes (its members' readiness,
  // level-triggered, would wake the loop for ever) and says so as this thread's uncaught exception.
  static void FailDetached(PollSetState* state) {
    const napi_env env = state->env;
    PollSet* owner = state->owner;
    const bool pinned = !state->members.empty();
    BeginCloseSet(state);
    if (owner != nullptr && pinned) owner->Unref();  // (pinned while it had members, as Close undoes)
    napi_handle_scope scope;
    if (napi_open_handle_scope(env, &scope) != napi_ok) return;
    napi_value code;
    napi_value message;
    napi_value error;
    if (napi_create_string_utf8(env, "ERR_INVALID_STATE", NAPI_AUTO_LENGTH, &code) == napi_ok &&
        napi_create_string_utf8(env,
                                "PollSet: its buffer was detached (transferred) or shrunk; the set is closed and "
                                "watches nothing",
                                NAPI_AUTO_LENGTH, &message) == napi_ok &&
        napi_create_error(env, code, message, &error) == napi_ok) {
      napi_fatal_exception(env, error);
    }
    napi_close_handle_scope(env, scope);
  }

  static void OnPoll(uv_poll_t* handle, int /*status*/, int /*events*/) {
    auto* state = static_cast<PollSetState*>(handle->data);
    if (state->closing || !state->js.live()) return;
    size_t pairs = 0;
    int32_t* slots = CurrentSlots(state, &pairs);
    if (slots == nullptr) {
      FailDetached(state);
      return;
    }
    int count;
    do {
      count = ::epoll_wait(state->epfd, state->ready.data(), static_cast<int>(pairs), 0);
    } while (count < 0 && errno == EINTR);
    if (count <= 0) return;
    for (int i = 0; i < count; i++) {
      const epoll_event& ready = state->ready[i];
      const int requested = static_cast<int>(ready.data.u64 >> 32);
      int events = 0;
      if ((ready.events & EPOLLIN) != 0) events |= UV_READABLE;
      if ((ready.events & EPOLLOUT) != 0) events |= UV_WRITABLE;
      if ((ready.events & EPOLLRDHUP) != 0) events |= UV_DISCONNECT;
      if ((ready.events & (EPOLLERR | EPOLLHUP)) != 0) events |= requested;
      slots[2 * i] = static_cast<int32_t>(ready.data.u64 & 0xffffffffu);
      slots[2 * i + 1] = events & requested;
    }
    const int32_t args[1] = {count};
    state->js.Call(state->env, state->owner != nullptr ? static_cast<napi_ref>(*state->owner) : nullptr, 1, args);
  }

  PollSetState* OpenState(Napi::Env env) {
    if (state_ == nullptr || state_->closing) {
      throw CodeError(env, "SOCKPOOL_ERR_POLLER_CLOSED", nullptr, "the PollSet is closed");
    }
    return state_;
  }

  // add or modify (`op`) from (fd, events, token): EEXIST to add an fd this set or a Poller of this thread already
  // watches, ENOENT to modify one that is not a member.
  Napi::Value Register(const Napi::CallbackInfo& info, int op) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    const int events = static_cast<int>(IntegerArg(info, 1, "events", 1, kPollEventMask));
    const auto token = static_cast<int32_t>(IntegerArg(info, 2, "token", INT32_MIN, INT32_MAX));
    PollSetState* state = OpenState(env);
    if (op == EPOLL_CTL_ADD && state->polled->count(fd) != 0) {
      ThrowErrno(env, EEXIST, "epoll_ctl", "fd " + std::to_string(fd));
    }
    if (op == EPOLL_CTL_MOD && state->members.count(fd) == 0) {
      ThrowErrno(env, ENOENT, "epoll_ctl", "fd " + std::to_string(fd));
    }
    epoll_event event;
    memset(&event, 0, sizeof event);
    event.events = EpollEventsFor(events);
    event.data.u64 = (static_cast<uint64_t>(events) << 32) | static_cast<uint32_t>(token);
    if (::epoll_ctl(state->epfd, op, fd, &event) < 0) ThrowErrno(env, errno, "epoll_ctl");
    if (op == EPOLL_CTL_ADD) {
      state->polled->insert(fd);
      state->members.insert(fd);
      if (state->members.size() == 1) {
        uv_ref(reinterpret_cast<uv_handle_t*>(&state->handle));
        Ref();  // while it has members the JS object must stay alive (as a started Poller's)
      }
    }
    return env.Undefined();
  }

  Napi::Value Add(const Napi::CallbackInfo& info) { return Register(info, EPOLL_CTL_ADD); }

  Napi::Value Modify(const Napi::CallbackInfo& info) { return Register(info, EPOLL_CTL_MOD); }

  // remove(fd): whether it was a member. Never throws for a member: the fd is no longer watched either way.
  Napi::Value Remove(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    const int fd = FdArg(info, 0);
    if (state_ == nullptr || state_->closing || state_->members.erase(fd) == 0) return Napi::Boolean::New(env, false);
    epoll_event unused;
    ::epoll_ctl(state_->epfd, EPOLL_CTL_DEL, fd, &unused);
    state_->polled->erase(fd);
    if (state_->members.empty()) {
      uv_unref(reinterpret_cast<uv_handle_t*>(&state_->handle));
      Unref();
    }
    return Napi::Boolean::New(env, true);
  }

  Napi::Value Close(const Napi::CallbackInfo& info) {
    if (state_ != nullptr && !state_->closing) {
      if (!state_->members.empty()) Unref();  // (pinned while it had members)
      BeginCloseSet(state_);  // the members' fds stay open (their owners')
    }
    return info.Env().Undefined();
  }
};

// Stops watching at once: uv_close takes the epoll fd out of the loop synchronously, so it may be closed here.
void BeginCloseSet(PollSetState* state) {
  if (state->closing) return;
  state->closing = true;
  for (const int fd : state->members) state->polled->erase(fd);
  state->members.clear();
  state->js.Release(state->env);
  if (state->buffer != nullptr) {
    napi_delete_reference(state->env, state->buffer);
    state->buffer = nullptr;
  }
  uv_close(reinterpret_cast<uv_handle_t*>(&state->handle), OnPollSetClosed);
  ::close(state->epfd);
  state->epfd = -1;
}

void OnPollSetClosed(uv_handle_t* handle) {
  auto* state = static_cast<PollSetState*>(handle->data);
  if (state->owner != nullptr) state->owner->Detach();
  if (state->teardown_hook != nullptr) napi_remove_async_cleanup_hook(state->teardown_hook);
  delete state;
}

SockpoolAddon::SockpoolAddon(Napi::Env env, Napi::Object exports) {
  DefineAddon(exports, {
                           InstanceMethod<&SockpoolAddon::SeqpacketListen>("seqpacketListen", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SeqpacketConnect>("seqpacketConnect", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SeqpacketPair>("seqpacketPair", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LoopbackPairListen>("loopbackPairListen", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LoopbackPairAwait>("loopbackPairAwait", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LoopbackPairTry>("loopbackPairTry", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LoopbackPairAccept>("loopbackPairAccept", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Accept>("accept", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SendMessage>("sendMessage", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::RecvMessage>("recvMessage", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::RecvMessages>("recvMessages", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SendDatagram>("sendDatagram", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::DatagramBind>("datagramBind", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::TcpSocket>("tcpSocket", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::BindAddress>("bindAddress", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::ConnectStart>("connectStart", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SocketError>("socketError", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LocalAddress>("localAddress", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::PeerAddress>("peerAddress", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetNoDelay>("setNoDelay", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetLingerReset>("setLingerReset", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::DisarmSocketLinger>("disarmLinger", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetKeepAlive>("setKeepAlive", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetUserTimeout>("setUserTimeout", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetMark>("setMark", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::BindToDevice>("bindToDevice", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetTcpUlp>("setTcpUlp", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::RestrictTcpBind>("restrictTcpBind", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::StartConnectGuard>("startConnectGuard", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::GuardSocket>("guardSocket", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::GuardCovers>("guardCovers", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::DropCapabilities>("dropCapabilities", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetRealtimePriority>("setRealtimePriority",
                                                                               napi_enumerable),
                           InstanceMethod<&SockpoolAddon::LocalRoutes>("localRoutes", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Probe>("probe", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::PeerCredentials>("peerCredentials", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::PeerGroups>("peerGroups", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::RefuseFdPassing>("refuseFdPassing", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::TcpCounters>("tcpCounters", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SameSocket>("sameSocket", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::TcpInfo>("tcpInfo", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SetTcpInfoScratch>("setTcpInfoScratch", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::TcpInfoScratch>("tcpInfoScratch", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::SocketInode>("socketInode", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::UnreadOutput>("unreadOutput", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Shutdown>("shutdown", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Disconnect>("disconnect", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Dup>("dup", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Close>("close", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::CloseNeverShared>("closeNeverShared", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Discard>("discard", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::StartCloseWatchdog>("startCloseWatchdog", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Untrack>("untrack", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::Track>("track", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::TrackedFds>("trackedFds", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::DeferredCloses>("deferredCloses", napi_enumerable),
                           InstanceMethod<&SockpoolAddon::ExitNow>("exitNow", napi_enumerable),
                           InstanceValue("Poller", Poller::Define(env), napi_enumerable),
                           InstanceValue("PollSet", PollSet::Define(env), napi_enumerable),
                           InstanceValue("READABLE", Napi::Number::New(env, UV_READABLE), napi_enumerable),
                           InstanceValue("WRITABLE", Napi::Number::New(env, UV_WRITABLE), napi_enumerable),
                           InstanceValue("DISCONNECT", Napi::Number::New(env, UV_DISCONNECT), napi_enumerable),
                       });
}

}  // namespace

NODE_API_ADDON(SockpoolAddon)
