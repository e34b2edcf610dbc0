// @generated automatically by Diesel CLI.

diesel::table! {
    task_engine_declarations (scope, set_hash) {
        scope -> Text,
        set_hash -> Text,
        generation -> Int8,
        first_seen -> Timestamptz,
        last_seen -> Timestamptz,
        applied -> Bool,
    }
}

diesel::table! {
    task_engine_instances (name) {
        name -> Text,
        host -> Text,
        pid -> Int4,
        task_types -> Array<Nullable<Text>>,
        started_at -> Timestamptz,
        last_seen_at -> Timestamptz,
        lease -> Nullable<Interval>,
        queues -> Nullable<Array<Nullable<Text>>>,
        connections -> Nullable<Jsonb>,
    }
}

diesel::table! {
    task_engine_queues (name) {
        name -> Text,
        paused -> Bool,
        concurrency -> Nullable<Int4>,
        key_concurrency -> Nullable<Int4>,
        rate_limit -> Nullable<Int4>,
        rate_period -> Nullable<Interval>,
        window_start -> Nullable<Timestamptz>,
        window_count -> Int4,
        updated_at -> Timestamptz,
    }
}

diesel::table! {
    task_engine_schedules (name) {
        name -> Text,
        cron -> Text,
        time_zone -> Text,
        task_class -> Text,
        task_parameters -> Jsonb,
        queue -> Text,
        priority -> Int4,
        max_attempts -> Int4,
        catch_up -> Int4,
        last_tick -> Nullable<Timestamptz>,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        declared_in -> Nullable<Text>,
    }
}
diesel::table! {
    task_executions (id) {
        id -> Int8,
        task_id -> Int8,
        attempt -> Int4,
        started_at -> Timestamptz,
        stopped_at -> Nullable<Timestamptz>,
        result -> Nullable<Jsonb>,
        error -> Nullable<Text>,
        instance -> Text,
        worker -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        snoozed_until -> Nullable<Timestamptz>,
        interrupted -> Bool,
    }
}

diesel::table! {
    tasks (id) {
        id -> Int8,
        task_class -> Text,
        task_parameters -> Jsonb,
        status -> Text,
        instance -> Nullable<Text>,
        priority -> Int4,
        run_at -> Timestamptz,
        attempts -> Int4,
        max_attempts -> Int4,
        created_at -> Timestamptz,
        updated_at -> Timestamptz,
        cancel_requested_at -> Nullable<Timestamptz>,
        queue -> Text,
        fair_key -> Text,
        progress -> Nullable<Int2>,
        progress_message -> Nullable<Text>,
        checkpoint -> Nullable<Jsonb>,
        unique_key -> Nullable<Text>,
        unique_scope -> Text,
        timeout_ms -> Nullable<Int4>,
    }
}

diesel::allow_tables_to_appear_in_same_query!(
    task_engine_declarations,
    task_engine_instances,
    task_engine_queues,
    task_engine_schedules,
    task_executions,
    tasks,
);
