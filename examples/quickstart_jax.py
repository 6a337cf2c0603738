"""Quickstart, JAX/optax: MVN-Grad as an optax GradientTransformation, the whole step under jax.jit."""

import jax
import jax.numpy as jnp
import optax

from xpoptim.adapters import optax as xo

kx, kt = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (256, 20))
y = jnp.argmax(x @ jax.random.normal(kt, (20, 3)), axis=1)  # labels a linear model can learn
params = {"w": jnp.zeros((20, 3)), "b": jnp.zeros(3)}
tx = xo.mvngrad(learning_rate=1e-2, weight_decay=1e-2)
state = tx.init(params)


@jax.jit
def train_step(params, state):
    loss, grads = jax.value_and_grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["w"] + p["b"], y).mean())(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss


for step in range(1, 201):
    params, state, loss = train_step(params, state)
    if step % 50 == 0:
        print(f"step {step:3d}  loss {float(loss):.4f}")
