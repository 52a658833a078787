//! Compute-dtype copies of parameters, written by the optimizer as it steps them.
//!
//! With f32 master weights and bf16 compute, every weight is cast on use: in the forward pass,
//! and again in the backward pass where a product needs it (some 650 cast kernels in a 0.5b
//! step). The trainer's AdamW kernels can write each parameter's bf16 copy as they step it
//! (2 bytes a value on top of the 28 they move) and [`remember`] it here, keyed by the memory
//! of the new value; [`GemmBackend::cast_param`](crate::GemmBackend::cast_param) then hands out
//! the copy instead of casting, for as long as the parameter holds that value. torch's
//! autocast keeps a cache of weight casts in the same spirit, filled by the first cast.
//!
//! ```text
//! optimizer step: new value p (f32), copy c = bf16(p) -> remember(p, c); forget(old p)
//! forward, backward: cast_param(p, bf16) -> c (no kernel); any other tensor -> a cast
//! ```
//!
//! An entry holds a handle to its parameter's memory, so that the memory can be neither
//! reused for another tensor nor changed in place while the entry lives (cubecl writes in
//! place only into memory that nothing else holds); the values behind a key are the ones the
//! copy was made from. Only a whole, contiguous view of the value finds its copy.

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use burn::tensor::DType;
use burn_cubecl::CubeRuntime;
use burn_cubecl::cubecl::device::{Device, DeviceId};
use burn_cubecl::tensor::CubeTensor;

/// A value's memory: its device, the memory's id, the byte range of the view.
type Key = (DeviceId, usize, Option<u64>, Option<u64>);

/// `(parameter value, copy)` as `(CubeTensor<R>, CubeTensor<R>)` of the runtime `R`.
type Entry = Box<dyn Any + Send + Sync>;

static COPIES: Mutex<Option<HashMap<Key, Entry>>> = Mutex::new(None);

fn copies() -> MutexGuard<'static, Option<HashMap<Key, Entry>>> {
    COPIES
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn key<R: CubeRuntime>(t: &CubeTensor<R>) -> Key {
    let handle = &t.handle;
    let memory = handle.memory.id();
    (
        t.device.to_id(),
        memory,
        handle.offset_start,
        handle.offset_end,
    )
}

/// Keeps `copy` (the same values as `value`, in another dtype) for `value`'s memory: the
/// casts of `value` to `copy`'s dtype return it from now on.
///
/// # Panics
/// If the two differ in their number of values.
pub fn remember<R: CubeRuntime>(value: &CubeTensor<R>, copy: CubeTensor<R>) {
    assert_eq!(
        value.meta.shape().num_elements(),
        copy.meta.shape().num_elements(),
        "a compute copy has as many values as its parameter"
    );
    let entry: Entry = Box::new((value.clone(), copy));
    copies()
        .get_or_insert_with(HashMap::new)
        .insert(key(value), entry);
}

/// Drops the copy kept for `value`'s memory, if any (the optimizer, as the value is replaced).
pub fn forget<R: CubeRuntime>(value: &CubeTensor<R>) {
    if let Some(copies) = copies().as_mut() {
        copies.remove(&key(value));
    }
}

/// Drops every kept copy (a training run, as it starts: a process's earlier run's last copies
/// would otherwise stay until it exits).
pub fn clear() {
    *copies() = None;
}

/// Whether any copy is kept (under fusion, a parameter's cast becomes an operation that can
/// take one only then).
pub fn any() -> bool {
    copies().as_ref().is_some_and(|copies| !copies.is_empty())
}

/// How many copies are kept.
pub fn count() -> usize {
    copies().as_ref().map_or(0, HashMap::len)
}

/// The copy of `t` in `dtype`, shaped as `t`, where one is kept for all of `t`'s memory and
/// `t` views it whole and contiguously.
pub fn lookup<R: CubeRuntime>(t: &CubeTensor<R>, dtype: DType) -> Option<CubeTensor<R>> {
    let guard = copies();
    let entry = guard.as_ref()?.get(&key(t))?;
    let (value, copy) = entry.downcast_ref::<(CubeTensor<R>, CubeTensor<R>)>()?;
    let numel = t.meta.shape().num_elements();
    let whole = t.dtype == value.dtype
        && t.is_contiguous()
        && numel == value.meta.shape().num_elements()
        && copy.dtype == dtype;
    whole.then(|| {
        CubeTensor::new_contiguous(
            copy.client.clone(),
            copy.device.clone(),
            t.meta.shape().clone(),
            copy.handle.clone(),
            dtype,
        )
    })
}
