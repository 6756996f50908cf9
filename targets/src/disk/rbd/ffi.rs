//! The part of the librados and librbd C APIs the RBD engine uses, loaded at run time with
//! `libloading` from the stable sonames `librados.so.2` and `librbd.so.1` (Ceph's
//! `rados/librados.h` and `rbd/librbd.h`; checked against librbd 1.16, Ceph 16.2). Loading
//! at run time lets the daemon run on hosts without Ceph: only opening an `rbd` export
//! needs the libraries, and fails with [`LoadError`] when they are missing.
//!
//! No Rust crate binds librbd usably today (see the workspace manifest's note on
//! `libloading`); the ~25 declarations below are the whole binding.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

/// `rados_t`: a cluster handle.
pub type RadosT = *mut c_void;
/// `rados_ioctx_t`: a pool (and namespace) I/O context.
pub type RadosIoctxT = *mut c_void;
/// `rbd_image_t`: an open image.
pub type RbdImageT = *mut c_void;
/// `rbd_completion_t`: an asynchronous operation's completion.
pub type RbdCompletionT = *mut c_void;
/// `rbd_callback_t`: called on a librbd thread when an asynchronous operation completes.
pub type RbdCallbackT = unsafe extern "C" fn(c: RbdCompletionT, arg: *mut c_void);
/// `rbd_update_callback_t`: called on a librbd thread when the image header changes.
pub type RbdUpdateCallbackT = unsafe extern "C" fn(arg: *mut c_void);

/// `RBD_LOCK_MODE_EXCLUSIVE` (`rbd_lock_mode_t`).
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `RBD_FEATURE_EXCLUSIVE_LOCK` (`rbd/features.h`).
pub const RBD_FEATURE_EXCLUSIVE_LOCK: u64 = 1 << 2;
/// `RBD_WRITE_ZEROES_FLAG_THICK_PROVISION`: zero the extent in place, keeping it allocated.
pub const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION: c_int = 1;

/// Function pointers into librados and librbd; the libraries stay loaded for the life of
/// the process (they are never unloaded: librados keeps threads running code in them).
#[allow(missing_docs)]
pub struct Api {
    pub rados_create: unsafe extern "C" fn(*mut RadosT, *const c_char) -> c_int,
    pub rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub rados_shutdown: unsafe extern "C" fn(RadosT),
    pub rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int,
    pub rados_ioctx_destroy: unsafe extern "C" fn(RadosIoctxT),
    pub rados_ioctx_set_namespace: unsafe extern "C" fn(RadosIoctxT, *const c_char),

    pub rbd_create: unsafe extern "C" fn(RadosIoctxT, *const c_char, u64, *mut c_int) -> c_int,
    pub rbd_open:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_open_read_only:
        unsafe extern "C" fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int,
    pub rbd_close: unsafe extern "C" fn(RbdImageT) -> c_int,
    pub rbd_get_size: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    pub rbd_get_features: unsafe extern "C" fn(RbdImageT, *mut u64) -> c_int,
    pub rbd_resize: unsafe extern "C" fn(RbdImageT, u64) -> c_int,
    pub rbd_flush: unsafe extern "C" fn(RbdImageT) -> c_int,
    pub rbd_lock_acquire: unsafe extern "C" fn(RbdImageT, c_int) -> c_int,
    pub rbd_update_watch:
        unsafe extern "C" fn(RbdImageT, *mut u64, RbdUpdateCallbackT, *mut c_void) -> c_int,
    pub rbd_update_unwatch: unsafe extern "C" fn(RbdImageT, u64) -> c_int,

    pub rbd_aio_create_completion:
        unsafe extern "C" fn(*mut c_void, RbdCallbackT, *mut RbdCompletionT) -> c_int,
    pub rbd_aio_get_return_value: unsafe extern "C" fn(RbdCompletionT) -> isize,
    pub rbd_aio_release: unsafe extern "C" fn(RbdCompletionT),
    pub rbd_aio_readv:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_writev:
        unsafe extern "C" fn(RbdImageT, *const libc::iovec, c_int, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_flush: unsafe extern "C" fn(RbdImageT, RbdCompletionT) -> c_int,
    pub rbd_aio_discard: unsafe extern "C" fn(RbdImageT, u64, u64, RbdCompletionT) -> c_int,
    pub rbd_aio_write_zeroes:
        unsafe extern "C" fn(RbdImageT, u64, usize, RbdCompletionT, c_int, c_int) -> c_int,

    _rados: Library,
    _rbd: Library,
}

/// librados or librbd could not be loaded (Ceph's client libraries are not installed), or
/// lacks a function this engine needs (too old).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct LoadError(String);

/// The loaded API, loading it on first use; the same error on every call when it failed.
pub fn api() -> Result<&'static Api, LoadError> {
    static API: OnceLock<Result<Api, LoadError>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, LoadError> {
    let open = |name: &str| {
        // SAFETY: loading runs the library's initialisers; librados and librbd are Ceph's
        // C client libraries, whose initialisers only set up their own globals.
        unsafe { Library::new(name) }.map_err(|e| {
            LoadError(format!(
                "cannot load {name} ({e}): rbd exports need Ceph's client libraries (Debian: apt-get install librbd1)"
            ))
        })
    };
    let rados = open("librados.so.2")?;
    let rbd = open("librbd.so.1")?;
    macro_rules! sym {
        ($lib:expr, $name:ident) => {{
            // SAFETY: the symbol is the C function of that name in Ceph's headers, and the
            // field it is stored in has exactly that C signature (see the declarations
            // above); the pointer stays valid because the library is kept in `Api`.
            let s = unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) };
            *s.map_err(|e| {
                LoadError(format!(
                    "{} lacks {} ({e}): Ceph's client libraries are too old (need librbd 1.16, Ceph 16 or later)",
                    stringify!($lib),
                    stringify!($name)
                ))
            })?
        }};
    }
    Ok(Api {
        rados_create: sym!(rados, rados_create),
        rados_conf_read_file: sym!(rados, rados_conf_read_file),
        rados_conf_set: sym!(rados, rados_conf_set),
        rados_connect: sym!(rados, rados_connect),
        rados_shutdown: sym!(rados, rados_shutdown),
        rados_ioctx_create: sym!(rados, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, rados_ioctx_destroy),
        rados_ioctx_set_namespace: sym!(rados, rados_ioctx_set_namespace),
        rbd_create: sym!(rbd, rbd_create),
        rbd_open: sym!(rbd, rbd_open),
        rbd_open_read_only: sym!(rbd, rbd_open_read_only),
        rbd_close: sym!(rbd, rbd_close),
        rbd_get_size: sym!(rbd, rbd_get_size),
        rbd_get_features: sym!(rbd, rbd_get_features),
        rbd_resize: sym!(rbd, rbd_resize),
        rbd_flush: sym!(rbd, rbd_flush),
        rbd_lock_acquire: sym!(rbd, rbd_lock_acquire),
        rbd_update_watch: sym!(rbd, rbd_update_watch),
        rbd_update_unwatch: sym!(rbd, rbd_update_unwatch),
        rbd_aio_create_completion: sym!(rbd, rbd_aio_create_completion),
        rbd_aio_get_return_value: sym!(rbd, rbd_aio_get_return_value),
        rbd_aio_release: sym!(rbd, rbd_aio_release),
        rbd_aio_readv: sym!(rbd, rbd_aio_readv),
        rbd_aio_writev: sym!(rbd, rbd_aio_writev),
        rbd_aio_flush: sym!(rbd, rbd_aio_flush),
        rbd_aio_discard: sym!(rbd, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, rbd_aio_write_zeroes),
        _rados: rados,
        _rbd: rbd,
    })
}
